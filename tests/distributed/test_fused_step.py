"""The fused teacher + student schedule on gloo, 2 processes: PP=2 (1F1B), PP=2 x VPP=2
(interleaved) and TP=2 + SP against the two-pass step it replaced (tests/two_pass_reference.py).

One spawn runs every layout twice (fused, two-pass) through the trainer: offpolicy mode, 4-layer
tiny model, 4 micro-batches per optimizer step, 2 optimizer steps. Expected: the same losses and
gradient norms and the same saved model and optimizer tensors, bit for bit. The two schedules
run the same operations on the same values (the boundary tensor is the concatenation of the two
models' hidden states, split again on arrival; the teacher's part of its gradient is zero), so
no tolerance is needed. On the last pipeline stage at most one micro-batch's teacher targets are
alive at a time, where the two-pass step held all 4.
"""

from __future__ import annotations

import pytest

from tests.dist_utils import run_distributed
from tests.unit.test_training_support import assert_checkpoints_equal, tiny_job

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = {
    "pp2": ["parallel.pp=2"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
}
COMMON = ["model.num_layers=4", "distill.mode=offpolicy", "train.rollout_steps=2",
          "train.global_batch_size=8", "train.micro_batch_size=2"]  # fmt: skip


def _layouts(rank, world_size, tmp_path):
    from megatron_opdlm.runtime import distributed
    from megatron_opdlm.training import steps
    from megatron_opdlm.training import trainer as trainer_module
    from tests import two_pass_reference as reference

    out = {}
    for layout, overrides in LAYOUTS.items():
        for name, run_step in (("fused", steps.run_step), ("two_pass", reference.run_step)):
            job = tiny_job(tmp_path, *COMMON, *overrides,
                           f"train.run_dir={tmp_path / f'run_{layout}_{name}'}",
                           f"checkpoint.save_dir={tmp_path / f'ckpt_{layout}_{name}'}")  # fmt: skip
            distributed.initialize(job.parallel, seed=job.train.seed)
            trainer_module.run_step = run_step
            with reference.LiveTargets() as live:
                result = trainer_module.Trainer(job).train()
            trainer_module.run_step = steps.run_step
            out[layout, name] = {
                "history": [(r["loss"], r["grad_norm"], r["skipped"]) for r in result.history],
                "max_alive": live.max_alive,
                "made": len(live.sizes),
            }
    return out


def test_fused_step_equals_two_pass_at_pp2_vpp_and_tp2_sp(tmp_path):
    tiny_job(tmp_path)  # writes the prompt files
    results = run_distributed(_layouts, world_size=2, args=(tmp_path,))
    for layout in LAYOUTS:
        last_stage = [1] if layout.startswith("pp") else [0, 1]
        for rank, result in enumerate(results):
            fused, two_pass = result[layout, "fused"], result[layout, "two_pass"]
            assert len(fused["history"]) == 2 and not any(h[2] for h in fused["history"])
            assert fused["history"] == two_pass["history"], (layout, rank)
            if rank in last_stage:  # 2 steps x 4 micro-batches of targets made here
                assert fused["made"] == two_pass["made"] == 8, (layout, rank)
                assert (fused["max_alive"], two_pass["max_alive"]) == (1, 4), (layout, rank)
            else:
                assert fused["made"] == two_pass["made"] == 0, (layout, rank)
        name = "iter_0000002"
        assert_checkpoints_equal(tmp_path / f"ckpt_{layout}_fused" / name,
                                 tmp_path / f"ckpt_{layout}_two_pass" / name)  # fmt: skip
