"""Training checkpoints across layouts (training/checkpointing.py), distributed optimizer.

- DP2 -> DP1: routine saves in `dp_reshardable` format (each rank writes its own optimizer
  shard), written asynchronously (megatron-core's async strategy on gloo); the DP=2 checkpoint
  loads at DP=1 and saved again there holds the same global tensors bit for bit.
- TP1 -> TP2: a `fully_reshardable` checkpoint of a one-process run loads at TP=2 and saved
  again holds the same global tensors bit for bit; a `dp_reshardable` one is refused with a
  message naming the fix (its buckets follow the TP/PP sharding of the parameters).
One spawn of 2 gloo ranks; offpolicy mode (no rollout) keeps it short.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.unit.test_training_support import assert_checkpoints_equal, save_teacher, tiny_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ["distill.mode=offpolicy", "train.rollout_steps=2",
          "parallel.use_distributed_optimizer=true"]  # fmt: skip


def _job(tmp_path, teacher, name, *overrides):
    return tiny_job(tmp_path, f"checkpoint.teacher={teacher}", f"train.run_dir={tmp_path / name}",
                    *COMMON, *overrides)  # fmt: skip


def _two_ranks(rank, world_size, tmp_path, teacher):
    from megatron_opdlm.runtime import distributed
    from megatron_opdlm.training.trainer import Trainer

    out = {}
    dp2 = _job(tmp_path, teacher, "dp2", f"checkpoint.save_dir={tmp_path / 'ckpt_dp2'}",
               "checkpoint.save_interval=1", "checkpoint.async_save=true")  # fmt: skip
    distributed.initialize(dp2.parallel, seed=dp2.train.seed)
    out["dp2_steps"] = Trainer(dp2).train().optimizer_step

    tp2 = _job(tmp_path, teacher, "tp2", "parallel.tp=2",
               f"checkpoint.load={tmp_path / 'ckpt_tp1_full'}",
               "checkpoint.optimizer_format=fully_reshardable",
               f"checkpoint.save_dir={tmp_path / 'ckpt_tp2'}")  # fmt: skip
    distributed.initialize(tp2.parallel, seed=tp2.train.seed)
    resumed = Trainer(tp2)
    out["tp2_resumed_at"] = resumed.rollout_step
    resumed.save()

    refused = _job(tmp_path, teacher, "tp2_refused", "parallel.tp=2",
                   f"checkpoint.load={tmp_path / 'ckpt_tp1_dp'}")  # fmt: skip
    distributed.initialize(refused.parallel, seed=refused.train.seed)
    try:
        Trainer(refused)
        out["refused"] = None
    except ValueError as exc:
        out["refused"] = str(exc)
    return out


def test_optimizer_checkpoints_reshard(single_process, tmp_path):
    from megatron_opdlm.training.trainer import Trainer

    teacher = save_teacher(tiny_job(tmp_path), tmp_path / "teacher")
    for fmt, name in (("fully_reshardable", "ckpt_tp1_full"), ("dp_reshardable", "ckpt_tp1_dp")):
        job = _job(tmp_path, teacher, name, f"checkpoint.optimizer_format={fmt}",
                   f"checkpoint.save_dir={tmp_path / name}")  # fmt: skip
        Trainer(job).train()
    results = run_distributed(_two_ranks, world_size=2, args=(tmp_path, teacher))
    for result in results:
        assert result["dp2_steps"] == 4 and result["tp2_resumed_at"] == 2
        assert "dp_reshardable" in result["refused"] and "fully_reshardable" in result["refused"]
    step = "iter_0000002"
    assert (tmp_path / "ckpt_dp2" / "latest").read_text().strip() == step  # async: completed
    assert (tmp_path / "ckpt_dp2" / "iter_0000001" / "optimizer" / "metadata.json").is_file()
    assert_checkpoints_equal(tmp_path / "ckpt_tp1_full" / step, tmp_path / "ckpt_tp2" / step)

    dp1 = _job(tmp_path, teacher, "dp1", f"checkpoint.load={tmp_path / 'ckpt_dp2'}",
               f"checkpoint.save_dir={tmp_path / 'ckpt_dp1'}")  # fmt: skip
    resumed = Trainer(dp1)
    assert resumed.rollout_step == 2
    resumed.save()
    assert_checkpoints_equal(tmp_path / "ckpt_dp2" / step, tmp_path / "ckpt_dp1" / step)
