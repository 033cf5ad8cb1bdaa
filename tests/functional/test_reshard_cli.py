"""tools/reshard_checkpoint.py on bad input: one line `error: ...`, exit 2, nothing written.

The conversion itself is tested in tests/distributed/test_checkpoint_reshard.py (through the
trainer, which calls the same `reshard.convert`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.functional.test_cli_errors import ENV, ROOT, RUNNER, _assert_one_line_error

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


def test_reshard_tool_bad_input(tmp_path):
    (tmp_path / "not_ckpt").mkdir()
    ckpt = _fake_dp_checkpoint(tmp_path / "save" / "iter_0000002")
    # Both cases in one process (RUNNER; torch's import is most of a run). Launched as 3
    # processes, which cannot take the saved tp=2: refused before any process group or model.
    cases = [[str(tmp_path / "not_ckpt")], [str(ckpt)]]
    payload = json.dumps([["megatron_opdlm.training.reshard:main", argv] for argv in cases])
    done = subprocess.run([sys.executable, "-c", RUNNER, payload], cwd=ROOT,
                          env={**ENV, "RANK": "0", "WORLD_SIZE": "3"}, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (status, stderr), (count_status, count_stderr) = json.loads(done.stdout.splitlines()[-1])
    _assert_one_line_error(status, stderr, "is not a training checkpoint", cases[0])
    _assert_one_line_error(count_status, count_stderr, "needs a multiple of 2 processes", cases[1])
    assert "torchrun --nproc-per-node 2" in count_stderr
    assert not (tmp_path / "save" / "iter_0000002_fully_reshardable").exists()
    assert not list((tmp_path / "save").glob(".*.tmp"))

    # the real command line
    help_text = subprocess.run([sys.executable, TOOL, "--help"], cwd=ROOT, env=ENV,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert help_text.returncode == 0 and "fully_reshardable" in help_text.stdout


def test_trainer_refuses_what_it_cannot_convert(tmp_path):
    """One process cannot take the saved tp=2: the trainer's conversion and the load's layout
    check both refuse before any model is built, naming the tool command (2 processes)."""
    from megatron_opdlm.training import checkpointing, reshard
    from tests.unit.test_training_support import tiny_job

    ckpt = _fake_dp_checkpoint(tmp_path / "save" / "iter_0000002")
    job = tiny_job(tmp_path, "parallel.use_distributed_optimizer=true")
    command = f"torchrun --nproc-per-node 2 tools/reshard_checkpoint.py {ckpt}"
    with pytest.raises(ValueError, match="needs a multiple of 2 processes") as raised:
        reshard.convert_if_needed(ckpt, job)
    assert command in str(raised.value)
    with pytest.raises(ValueError, match="dp_reshardable format") as raised:
        checkpointing.check_resume_layout(ckpt, job)
    assert command in str(raised.value)
    assert not reshard.converted_path(ckpt).exists()
