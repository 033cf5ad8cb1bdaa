"""tools/train.py as users run it: exact resume after a real SIGTERM, and a SIGKILL mid-save.

Every run is a separate `python tools/train.py` process with one thread (identical float
summation order in all of them, so "identical" means bit-identical).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_opdlm.training.preemption import EXIT_RESUME
from tests.unit.test_training_support import assert_checkpoints_equal, write_prompts

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

CONFIG = """
model: {num_layers: 2, hidden_size: 64, ffn_hidden_size: 128, num_attention_heads: 4,
        num_query_groups: 2, vocab_size: 120, vocab_pad_multiple: 8, eos_token_ids: [1],
        pad_token_id: 0, init_method_std: 0.3, max_position_embeddings: 256}
precision: {transformer_impl: local}
rollout: {max_new_tokens: 16, steps_per_block: 2}
optim: {lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 1, weight_decay: 0.01}
data: {train_prompts: PROMPTS}
train: {rollout_steps: 6, prompts_per_rollout: 8, global_batch_size: 8, micro_batch_size: 4,
        tensorboard: false}
"""


def _env() -> dict:
    # A single-process run picks a free port unless MASTER_PORT is set: drop what an in-process
    # test of this session may have exported, or concurrent runs would share one port.
    launch = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in launch}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _config(tmp_path: Path) -> Path:
    prompts = write_prompts(tmp_path / "prompts.jsonl", 48)
    path = tmp_path / "job.yaml"
    path.write_text(CONFIG.replace("PROMPTS", str(prompts)))
    return path


def _train(config: Path, run: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, str(REPO / "tools" / "train.py"), "--config", str(config)]
    command += [f"train.run_dir={run}", f"checkpoint.save_dir={run / 'ckpt'}", *overrides]
    return subprocess.Popen(
        command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(process: subprocess.Popen, timeout: float = 300, code: int = 0) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == code, output[-3000:]
    return output


def _train_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    config = _config(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    reference = _train(config, straight)

    interrupted = _train(config, split)
    deadline = time.monotonic() + 240
    while not (split / "metrics.jsonl").exists() or not _train_records(split):
        assert interrupted.poll() is None, interrupted.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no training step within 240 s"
        time.sleep(0.02)
    interrupted.send_signal(signal.SIGTERM)  # during or right after the first step
    output = _finish(interrupted, code=EXIT_RESUME)
    assert "stopped early (signal SIGTERM)" in output
    assert "signal to checkpoint on disk" in output
    # The stop may land in a rollout (step dropped) or between steps: either way the checkpoint
    # holds exactly the optimizer steps recorded.
    stopped_at = len(_train_records(split))
    assert 1 <= stopped_at < 6
    latest = (split / "ckpt" / "latest").read_text().strip()
    assert latest == f"iter_{stopped_at:07d}"

    _finish(_train(config, split))  # resumes from ckpt/latest
    _finish(reference)
    want, got = _train_records(straight), _train_records(split)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "lr", "loss_tokens", "rollout_tokens"):
        assert [r[key] for r in got] == [r[key] for r in want], key
    assert_checkpoints_equal(straight / "ckpt" / "iter_0000006", split / "ckpt" / "iter_0000006")


KILLER = """
import os, signal, sys
from megatron.core import dist_checkpointing
from megatron_opdlm.training import checkpointing
from megatron_opdlm.training.cli import main

calls = {"n": 0}
original = dist_checkpointing.save

def save_then_die(state, directory, *args, **kwargs):
    result = original(state, directory, *args, **kwargs)
    calls["n"] += 1
    if calls["n"] == 3:  # the second checkpoint: model written, optimizer not yet
        os.kill(os.getpid(), signal.SIGKILL)
    return result

if __name__ == "__main__":
    dist_checkpointing.save = save_then_die
    sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    config = _config(tmp_path)
    run = tmp_path / "run"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    command = [sys.executable, str(killer), "--config", str(config), f"train.run_dir={run}",
               f"checkpoint.save_dir={run / 'ckpt'}", "checkpoint.save_interval=2",
               "train.rollout_steps=4"]  # fmt: skip
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        # Own session: the checkpoint writer's helper process outlives a SIGKILLed parent, so
        # the test ends the whole group it started (and never waits on an inherited pipe).
        killed = subprocess.Popen(command, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
        try:
            returncode = killed.wait(timeout=300)
        finally:
            try:
                os.killpg(killed.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert returncode == -signal.SIGKILL, log.read_text()[-3000:]
    ckpt = run / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    assert (ckpt / ".iter_0000004.tmp" / "model").is_dir()  # the half-written one
    assert not (ckpt / "iter_0000004").exists()
    # The previous checkpoint loads and training continues from it to the end.
    output = _finish(_train(config, run, "checkpoint.save_interval=2", "train.rollout_steps=4"))
    assert "resumed from" in output and "iter_0000002 (rollout step 2)" in output
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    assert not (ckpt / ".iter_0000004.tmp").exists()
    assert [r["step"] for r in _train_records(run)] == [1, 2, 3, 4]
