"""The lm-eval backend refuses bad model arguments with one line naming them, before loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra [eval]")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "pretrained=DIR is required"),
        ({"pretrained": "/nonexistent/dir"}, "is not a directory"),
        ({"pretrained": ".", "batch_size": "auto"}, "batch_size=auto"),
        ({"pretrained": ".", "dtype": "int8"}, "dtype='int8'"),
        ({"pretrained": ".", "max_gen_toks": 0}, "max_gen_toks=0"),
        ({"pretrained": ".", "temprature": 0.5}, "unknown model_args"),
    ],
)
def test_bad_model_args(kwargs, match):
    from megatron_opdlm.evaluation.lm_eval_backend import OpdlmLM

    with pytest.raises(ValueError, match=match):
        OpdlmLM(**kwargs)


@pytest.mark.slow
def test_cli_answers_a_bad_checkpoint_in_one_line(tmp_path):
    command = [sys.executable, "-m", "megatron_opdlm.evaluation.lm_eval_cli", "--model", "opdlm",
               "--model_args", f"pretrained={tmp_path / 'missing'}", "--tasks", "opdlm_qa",
               "--include_path", str(ROOT / "megatron_opdlm/evaluation/lm_eval_tasks")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: pretrained='{tmp_path / 'missing'}' is not a directory"
    )
    assert "Traceback" not in done.stderr
