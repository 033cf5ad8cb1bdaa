"""Sequence parallelism in the on-policy mode: TP=2 + SP == TP=2 == one process (opdlm).

One spawn of 2 gloo ranks trains the same tiny job (mode opdlm: the student's own rollouts, the
sampler switches SP off for decoding) at TP=2 with and without sequence parallelism; the parent
runs it in one process. The training rows (S = P + 2R, P the batch's longest prompt) are padded
to a multiple of TP under SP, and the row projection gathers the sequence first
(models.projection): the losses of the first rollout step (two optimizer steps, the rollout made
by the initial student) must match. Tolerance rtol 5e-5, as tests/distributed/test_train_parallel:
TP splits the matmuls and the vocab softmax (fp32 rounding), which Adam amplifies a little in the
second step; SP adds a gather / reduce-scatter, the same sums in another order.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.unit.test_training_support import save_teacher, tiny_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = {"tp2": ["parallel.tp=2"], "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"]}
# 5-token prompts would make S odd without the padding; mode opdlm rolls out with the student.
COMMON = ["distill.mode=opdlm", "train.rollout_steps=1", "train.global_batch_size=4",
          "train.micro_batch_size=2"]  # fmt: skip


def _job(tmp_path, name, teacher, *overrides):
    return tiny_job(tmp_path, f"checkpoint.teacher={teacher}", f"train.run_dir={tmp_path / name}",
                    *COMMON, *overrides)  # fmt: skip


def _layouts(rank, world_size, tmp_path, teacher):
    from megatron_opdlm.runtime import distributed
    from megatron_opdlm.training.trainer import Trainer

    out = {}
    for name, layout in LAYOUTS.items():
        job = _job(tmp_path, name, teacher, *layout)
        distributed.initialize(job.parallel, seed=job.train.seed)
        result = Trainer(job).train()
        out[name] = {
            "losses": [r["loss"] for r in result.history],
            "rollout_tokens": [r["rollout_tokens"] for r in result.history],
        }
    return out


def test_sequence_parallel_matches_tp_and_one_process(single_process, tmp_path):
    from megatron_opdlm.training.trainer import Trainer

    teacher = save_teacher(tiny_job(tmp_path), tmp_path / "teacher")
    results = run_distributed(_layouts, world_size=2, args=(tmp_path, teacher))
    reference = Trainer(_job(tmp_path, "reference", teacher)).train()
    want = [r["loss"] for r in reference.history]
    tokens = [r["rollout_tokens"] for r in reference.history]
    assert len(want) == 2
    for rank_result in results:
        for name in LAYOUTS:
            # the same rollout (the sampler is TP-independent) ...
            assert rank_result[name]["rollout_tokens"] == tokens, name
            # ... and the same losses
            assert rank_result[name]["losses"] == pytest.approx(want, rel=5e-5), name
