"""Training checkpoints across layouts (training/checkpointing.py, training/reshard.py),
distributed optimizer. References are one-process runs of the same training state.

- DP2 -> DP1: routine saves in `dp_reshardable` format (each rank writes its own optimizer
  shard), written asynchronously (megatron-core's async strategy on gloo); the DP=2 checkpoint
  loads at DP=1 and saved again there holds the same global tensors bit for bit.
- TP1 -> TP2 (fully_reshardable): a one-process checkpoint loads at TP=2, saved again it holds
  the same global tensors bit for bit.
- TP1 x DP2 -> TP2 (dp_reshardable): the trainer converts the checkpoint itself (at TP1 x DP2 on
  the same two ranks) into `iter_0000002_fully_reshardable` and moves `latest` to it. That copy
  and the TP=2 run's re-save equal, bit for bit, the DP2 checkpoint loaded at DP=1 (megatron-
  core's own DP resharding) and saved fully_reshardable; the next steps' losses agree.
- PP1 -> PP2 (dp_reshardable): a one-process dp_reshardable checkpoint converted (at DP=2) and
  resumed at PP=2 re-saves the same tensors as the one-process fully_reshardable checkpoint.
One spawn of 2 gloo ranks; offpolicy mode (no rollout) keeps it short.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.dist_utils import run_distributed
from tests.functional.test_cli_errors import ENV, ROOT
from tests.unit.test_training_support import assert_checkpoints_equal, save_teacher, tiny_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["distill.mode=offpolicy", "train.rollout_steps=2",
          "parallel.use_distributed_optimizer=true"]  # fmt: skip
FULL = "checkpoint.optimizer_format=fully_reshardable"
STEP = "iter_0000002"
# One more rollout step (2 optimizer steps) after the resume at step 2: its losses are compared.
NEXT = "train.rollout_steps=3"


def _job(tmp_path, teacher, name, *overrides):
    return tiny_job(tmp_path, f"checkpoint.teacher={teacher}", f"train.run_dir={tmp_path / name}",
                    *COMMON, *overrides)  # fmt: skip


def _resume_save_train(job, train: bool):
    """Resume `job`, save at once (the re-save compared), then optionally train on."""
    from megatron_opdlm.training.trainer import Trainer

    resumed = Trainer(job)
    resumed_at, loaded = resumed.rollout_step, str(resumed.resume_from)
    resumed.save()
    if train:
        resumed.train()
    return resumed_at, loaded


def _two_ranks(rank, world_size, tmp_path, teacher):
    from megatron_opdlm.runtime import distributed
    from megatron_opdlm.training.trainer import Trainer

    out = {}
    dp2 = _job(tmp_path, teacher, "dp2", f"checkpoint.save_dir={tmp_path / 'ckpt_dp2'}",
               "checkpoint.save_interval=1", "checkpoint.async_save=true")  # fmt: skip
    distributed.initialize(dp2.parallel, seed=dp2.train.seed)
    out["dp2_steps"] = Trainer(dp2).train().optimizer_step

    cases = {
        "tp2_full": (["parallel.tp=2", f"checkpoint.load={tmp_path / 'ckpt_tp1_full'}"], False),
        # the save directory, not the iteration: its `latest` is followed, then moved
        "tp2_from_dp2": (["parallel.tp=2", f"checkpoint.load={tmp_path / 'ckpt_dp2'}", NEXT],
                         True),
        "pp2_from_dp": (["parallel.pp=2", f"checkpoint.load={tmp_path / 'ckpt_tp1_dp'}"], False),
    }  # fmt: skip
    for name, (overrides, train) in cases.items():
        job = _job(tmp_path, teacher, name, *overrides, FULL,
                   f"checkpoint.save_dir={tmp_path / f'ckpt_{name}'}")  # fmt: skip
        distributed.initialize(job.parallel, seed=job.train.seed)
        out[name] = _resume_save_train(job, train)
    return out


def _adam_steps(ckpt) -> list:
    """Every 'step' of the optimizer's common state (torch Adam's step count: fully_reshardable
    keeps it in the param groups, not among the tensors assert_checkpoints_equal compares)."""
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    found = []

    def walk(value):
        if isinstance(value, dict):
            for key, item in sorted(value.items(), key=lambda kv: str(kv[0])):
                if key == "step":
                    found.append(item)
                else:
                    walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(load_common_state_dict(str(ckpt / "optimizer")))
    return found


def _assert_same_state(reference, other) -> None:
    assert_checkpoints_equal(reference, other)
    steps = _adam_steps(reference)
    assert steps and steps == _adam_steps(other), (steps, _adam_steps(other))


def _losses(run_dir) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_optimizer_checkpoints_reshard(single_process, tmp_path):
    from megatron_opdlm.training.trainer import Trainer

    teacher = save_teacher(tiny_job(tmp_path), tmp_path / "teacher")
    for fmt, name in (("fully_reshardable", "ckpt_tp1_full"), ("dp_reshardable", "ckpt_tp1_dp")):
        job = _job(tmp_path, teacher, name, f"checkpoint.optimizer_format={fmt}",
                   f"checkpoint.save_dir={tmp_path / name}")  # fmt: skip
        Trainer(job).train()
    results = run_distributed(_two_ranks, world_size=2, args=(tmp_path, teacher))
    converted = tmp_path / "ckpt_dp2" / f"{STEP}_fully_reshardable"
    converted_pp = tmp_path / "ckpt_tp1_dp" / f"{STEP}_fully_reshardable"
    for result in results:
        assert result["dp2_steps"] == 4
        assert result["tp2_full"] == (2, str(tmp_path / "ckpt_tp1_full" / STEP))
        assert result["tp2_from_dp2"] == (2, str(converted))
        assert result["pp2_from_dp"] == (2, str(converted_pp))
    assert (tmp_path / "ckpt_dp2" / "iter_0000001" / "optimizer" / "metadata.json").is_file()
    assert (tmp_path / "ckpt_dp2" / "latest").read_text().strip() == converted.name
    state = json.loads((converted / "trainer_state.json").read_text())
    assert state["optimizer_format"] == "fully_reshardable" and state["resharded_from"] == STEP
    _assert_same_state(tmp_path / "ckpt_tp1_full" / STEP, tmp_path / "ckpt_tp2_full" / STEP)
    _assert_same_state(tmp_path / "ckpt_tp1_full" / STEP, converted_pp)
    _assert_same_state(tmp_path / "ckpt_tp1_full" / STEP, tmp_path / "ckpt_pp2_from_dp" / STEP)

    original = tmp_path / "ckpt_dp2" / STEP  # the dp_reshardable one (latest names the copy)
    dp1 = _job(tmp_path, teacher, "dp1", f"checkpoint.load={original}",
               f"checkpoint.save_dir={tmp_path / 'ckpt_dp1'}")  # fmt: skip
    assert _resume_save_train(dp1, train=False) == (2, str(original))
    assert_checkpoints_equal(original, tmp_path / "ckpt_dp1" / STEP)

    # The reference of the TP1 x DP2 -> TP2 conversion: megatron-core's DP2 -> DP1 load, saved
    # in model space, then the same next rollout step in one process.
    reference = _job(tmp_path, teacher, "dp1_full", f"checkpoint.load={original}", FULL, NEXT,
                     f"checkpoint.save_dir={tmp_path / 'ckpt_dp1_full'}")  # fmt: skip
    assert _resume_save_train(reference, train=True) == (2, str(original))
    _assert_same_state(tmp_path / "ckpt_dp1_full" / STEP, converted)
    _assert_same_state(tmp_path / "ckpt_dp1_full" / STEP, tmp_path / "ckpt_tp2_from_dp2" / STEP)
    expected, got = _losses(tmp_path / "dp1_full"), _losses(tmp_path / "tp2_from_dp2")
    assert sorted(got) == sorted(expected) == [5, 6]
    # Step 5 is computed from the same (bitwise equal) parameters and batch; TP=2 adds the
    # row-parallel partial sums in another order (fp32) and splits the vocab-parallel softmax:
    # measured 1.1e-7 relative. Step 6 adds one Adam step from those gradients (lr 1e-2):
    # measured 2.5e-7; a wrong optimizer state moves it by order 1e-2 here.
    assert math.isclose(got[5], expected[5], rel_tol=1e-5), (got, expected)
    assert math.isclose(got[6], expected[6], rel_tol=1e-4), (got, expected)

    # The offline tool (the path for a process count the trainer cannot convert with), run as a
    # user would: one process, as saved; --output elsewhere leaves the input's `latest` alone.
    out = tmp_path / "tool_copy"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "reshard_checkpoint.py"),
                           str(tmp_path / "ckpt_tp1_dp" / STEP), "--output", str(out)],
                          env=ENV, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_state(tmp_path / "ckpt_tp1_full" / STEP, out)
    assert (tmp_path / "ckpt_tp1_dp" / "latest").read_text().strip() == converted_pp.name
