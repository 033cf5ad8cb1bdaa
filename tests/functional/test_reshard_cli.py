"""tools/reshard_checkpoint.py on bad input: one line `error: ...`, exit 2, nothing written.

The conversion itself is tested in tests/distributed/test_checkpoint_reshard.py (through the
trainer, which calls the same `reshard.convert`).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.functional.test_cli_errors import ENV, ROOT, _assert_one_line_error

TOOL = str(ROOT / "tools" / "reshard_checkpoint.py")


def _fake_dp_checkpoint(directory):
    """The files a training checkpoint is recognised by, saved at tp=2 in dp_reshardable format
    (the process-count check reads only these, before any tensor)."""
    for sub in ("model", "optimizer"):
        (directory / sub).mkdir(parents=True)
    (directory / "opdlm_model.yaml").write_text("format_version: 1\n")
    (directory / "config.yaml").write_text(
        "parallel:\n  tp: 2\n  use_distributed_optimizer: true\n"
    )
    state = {"rollout_step": 2, "within_step": 0, "optimizer_format": "dp_reshardable",
             "optimizer_saved": True,
             "layout": {"world_size": 2, "tp": 2, "pp": 1, "vpp": 0}}  # fmt: skip
    (directory / "trainer_state.json").write_text(json.dumps(state))
    return directory


def _run(argv, **env):
    return subprocess.run([sys.executable, TOOL, *argv], cwd=ROOT, env={**ENV, **env},
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_reshard_tool_bad_input(tmp_path):
    (tmp_path / "not_ckpt").mkdir()
    done = _run([str(tmp_path / "not_ckpt")])
    _assert_one_line_error(done.returncode, done.stderr, "is not a training checkpoint", "dir")

    ckpt = _fake_dp_checkpoint(tmp_path / "save" / "iter_0000002")
    # 3 processes cannot take tp=2: refused before any process group or model
    done = _run([str(ckpt)], RANK="0", WORLD_SIZE="3")
    _assert_one_line_error(done.returncode, done.stderr, "needs a multiple of 2 processes", "n")
    assert "torchrun --nproc-per-node 2" in done.stderr
    assert not (tmp_path / "save" / "iter_0000002_fully_reshardable").exists()
    assert not list((tmp_path / "save").glob(".*.tmp"))

    help_text = _run(["--help"])
    assert help_text.returncode == 0 and "fully_reshardable" in help_text.stdout
