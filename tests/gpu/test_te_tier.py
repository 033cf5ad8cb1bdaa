"""Transformer Engine tier: the TE spec against the local one, the padded teacher, cached
rollouts and an FP8 training step on TE. `make test-gpu-te` (NGC PyTorch image, or TE installed).

Weights go from a local-spec model to a TE-spec one through our checkpoint (megatron-core maps
the local layer norms to TE's fused `layer_norm_weight` keys), so both compute the same function.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from packaging.version import Version

from tests.gpu.gpu_support import gpu_overrides, mean_kl, requires_te

pytestmark = [pytest.mark.gpu, requires_te]


def _pair(job_local, job_te, role, tmp_path):
    """(local chunks, TE chunks) of `role` with the same weights."""
    from megatron_opdlm.checkpoint_layout import load_model_checkpoint, save_model_checkpoint
    from megatron_opdlm.models import builder

    build = builder.build_teacher if role == "teacher" else builder.build_student
    torch.manual_seed(0)
    local = build(job_local)
    directory = tmp_path / f"{role}_weights"
    save_model_checkpoint(local, directory, job_local.model)
    te = build(job_te)
    load_model_checkpoint(te, directory)
    return local, te


def _jobs(*extra, dtype="bf16"):
    from tests.tiny import tiny_config

    # peaked outputs; no rollout here, so no cached-rollout TE version check
    common = ["model.init_method_std=0.3", "diffusion.block_size=4", "rollout.use_kv_cache=false",
              *extra]  # fmt: skip
    local = tiny_config(*gpu_overrides(*common, dtype=dtype))
    te = tiny_config(*gpu_overrides(*common, impl="transformer_engine", dtype=dtype))
    return local, te


def test_te_student_matches_the_local_student_in_bf16(single_process, tmp_path):
    from megatron_opdlm.models import masks

    job_local, job_te = _jobs()
    local, te = _pair(job_local, job_te, "student", tmp_path)
    tokens = torch.randint(2, 120, (2, 16), device="cuda")
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[0, :3] = False  # a left-padded row
    mask = masks.block_causal_mask(16, 4, 4, valid)
    positions = torch.arange(16, device="cuda").expand(2, -1)
    with torch.no_grad():
        want = local[0](tokens, positions, mask).float()  # [b, s, V]
        got = te[0](tokens, positions, mask).float()
    kl = mean_kl(want[valid], got[valid])
    # bf16 (8-bit mantissa, 3.9e-3 relative per rounding) through 2 layers whose kernels fuse
    # differently (TE's norm+GEMM, fused attention softmax): a few roundings, far below the
    # >1e-1 that a mask ignored on the padded row gives
    assert kl < 1e-2, kl
    assert (want.argmax(-1)[valid] == got.argmax(-1)[valid]).float().mean() > 0.95


def test_padded_teacher_on_te_matches_local_and_honours_the_padding(
    single_process, tmp_path, monkeypatch
):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_opdlm.models import specs
    from tests.unit.test_gpu_path import _ragged_batch, _teacher_targets

    job_local, job_te = _jobs("distill.mode=offpolicy")
    local, te = _pair(job_local, job_te, "teacher", tmp_path)
    records = _ragged_batch(job_te)
    micro, want = _teacher_targets(local, records, job_local)
    _, got = _teacher_targets(te, records, job_te)
    fixed = mean_kl(want.logprobs, got.logprobs, log_probs=True)
    # the f91ed8a choice (plain causal on TE), to show what an ignored padding costs here
    monkeypatch.setattr(specs, "attention_mask_type",
                        lambda role, impl: AttnMaskType.causal)  # fmt: skip
    _, causal_te = _pair(job_local, job_te, "teacher", tmp_path / "causal")
    _, ignored = _teacher_targets(causal_te, records, job_te)
    broken = mean_kl(want.logprobs, ignored.logprobs, log_probs=True)
    print(f"\n[gpu] teacher KL(local || TE): {fixed:.2e}; with TE's causal type: {broken:.2e}")
    assert fixed < 1e-2 and fixed < 0.1 * broken, (fixed, broken)


def test_cached_rollout_on_te_gives_the_no_cache_tokens(single_process):
    from megatron_opdlm.diffusion.sampler import generate
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.runtime import te_support
    from tests.tiny import tiny_config

    job = tiny_config(*gpu_overrides("rollout.temperature=0", "rollout.remasking=static",
                                     impl="transformer_engine", dtype="fp32"))  # fmt: skip
    version = te_support.installed_te_version()
    if version < Version(te_support.CACHED_ROLLOUT_MIN_TE):
        with pytest.raises(ValueError, match="older than 2.2"):
            build_student(job)
        pytest.skip(f"Transformer Engine {version} < 2.2: cached rollouts are refused (checked)")
    torch.manual_seed(0)
    student = build_student(job)
    with torch.no_grad():
        student[0].output_layer.weight.mul_(30.0)  # sharp distributions: no near-ties
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24]]  # ragged: left padding
    tokens = {}
    for cache in (True, False):
        rollout = dataclasses.replace(job.rollout, use_kv_cache=cache)
        batch = generate(student, prompts, job.model, job.diffusion, rollout, max_new_tokens=16)
        tokens[cache] = batch.response_tokens.cpu()
    assert torch.equal(tokens[True], tokens[False])


def test_an_fp8_training_step_on_te(single_process, tmp_path):
    from megatron_opdlm.runtime import te_support
    from megatron_opdlm.training.trainer import Trainer
    from tests.unit.test_training_support import tiny_job

    capability = te_support.gpu_capability()
    if capability < (8, 9):
        pytest.skip(f"compute capability {capability}: this GPU has no FP8")
    cached = te_support.installed_te_version() >= Version(te_support.CACHED_ROLLOUT_MIN_TE)
    job = tiny_job(tmp_path, *gpu_overrides("distill.mode=opdlm", "train.rollout_steps=2",
                                            "precision.fp8=hybrid", "precision.fp8_recipe=delayed",
                                            f"rollout.use_kv_cache={str(cached).lower()}",
                                            impl="transformer_engine"))  # fmt: skip
    trainer = Trainer(job)
    student_config = trainer.models.student[0].config
    teacher_config = trainer.models.teacher[0].config
    assert student_config.fp8 == "hybrid" and not teacher_config.fp8  # FP8 only in training
    result = trainer.train()
    losses = [r["loss"] for r in result.history if not r["skipped"]]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    assert all(torch.isfinite(torch.tensor(r["grad_norm"])) for r in result.history)
