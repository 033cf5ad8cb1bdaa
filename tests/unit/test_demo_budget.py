"""examples/demo.py's training budget: rollout steps done, and the cap reported when it hit."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_budget_is_rollout_steps_and_the_cap_is_reported(tmp_path):
    demo = _demo()
    assert demo.parse_args([]).rollout_steps == demo.ROLLOUT_STEPS == 22
    records = [{"kind": "train", "rollout_step": step, "rollout_tokens": 100} for step in (0, 0, 1)]
    records.append({"kind": "eval", "rollout_step": 2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert demo.rollout_steps_done(tmp_path) == 2 and demo.training_tokens(tmp_path) == 200
    full = {"requested": 2, "done": 2, "max_minutes": 13.0, "cap_hit": False}
    assert demo.budget_line(full) == "OPDLM training: 2 of 2 rollout steps"
    capped = dict(full, requested=22, cap_hit=True)
    assert "2 of 22 rollout steps (stopped by the 13-min wall-clock cap" in demo.budget_line(capped)
