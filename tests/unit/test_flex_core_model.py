"""The FlexAttention core inside the tiny student GPTModel (local linears, CPU, fp32) against
megatron's DotProductAttention on the same weights: teacher rows, packed student rows, the
sampler's cached rounds (greedy tokens), the rollout engine's slots, and CPU training (dense
SDPA fallback) with selective recompute of core attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_opdlm.diffusion.packing import pack_batch
from megatron_opdlm.diffusion.sampler import generate
from megatron_opdlm.diffusion.states import select_states
from megatron_opdlm.models import flex_attention as fa
from megatron_opdlm.models.masks import mask_format
from tests.tiny import tiny_config

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24]]
# fp32 logits through 2 layers; flex / SDPA vs baddbmm + softmax differ by summation order (~1e-7)
ATOL = 1e-5


@pytest.fixture(scope="module")
def models():
    from megatron_opdlm.models.builder import build_student, copy_weights
    from megatron_opdlm.runtime import distributed

    # QK-norm on (Qwen3-style), GQA (4 heads over 2 groups), RoPE at the packed rows' positions
    common = ("rollout.temperature=0", "rollout.remasking=static", "model.qk_layernorm=true")
    local_cfg = tiny_config(*common)
    flex_cfg = tiny_config(
        *common, "precision.attention_backend=flex", "precision.recompute=selective"
    )
    distributed.initialize(local_cfg.parallel, seed=1234)
    torch.manual_seed(0)
    local = build_student(local_cfg)
    with torch.no_grad():  # sharper distributions, like a trained model
        local[0].output_layer.weight.mul_(30.0)
    flex = build_student(flex_cfg)
    copy_weights(local, flex)
    yield local_cfg, local, flex_cfg, flex
    distributed.shutdown()


def test_spec_substitutes_the_core(models):
    _, local, _, flex = models
    cores = [m.core_attention for m in flex[0].modules() if hasattr(m, "core_attention")]
    assert cores and all(isinstance(c, fa.FlexCoreAttention) for c in cores)
    assert mask_format(flex) == "columns" and mask_format(local) == "dense"
    assert local[0].state_dict().keys() == flex[0].state_dict().keys()  # checkpoints load both


def test_greedy_tokens_equal_local_core(models):
    local_cfg, local, _, flex = models
    # cached rounds (with and without token shift: fused commit, carry) and full forwards
    for cache, shift in ((True, False), (True, True), (False, False)):
        rollout = dataclasses.replace(local_cfg.rollout, use_kv_cache=cache)
        diffusion = dataclasses.replace(local_cfg.diffusion, token_shift=shift)
        runs = [
            generate(chunks, PROMPTS, local_cfg.model, diffusion, rollout, 12)
            for chunks in (local, flex)
        ]
        assert torch.equal(runs[0].response_tokens, runs[1].response_tokens), (cache, shift)
        assert torch.equal(runs[0].step_map, runs[1].step_map)


def test_engine_runs_the_flex_model_on_its_slots(models):
    """The rollout engine decodes a flex-core model itself (no lock-step fallback): on S < N slots,
    sampled, the flex model's tokens and step map equal the local core's, and every round's
    logits agree to ATOL (SDPA on the engine's dense masks vs megatron's baddbmm core)."""
    from megatron_opdlm.diffusion.engine import generate_rollout

    local_cfg, local, _, flex = models
    rollout = dataclasses.replace(
        local_cfg.rollout, temperature=1.0, remasking="dynamic", threshold=0.7
    )
    runs = []
    for chunks in (local, flex):
        rounds, stats = [], {}
        batch = generate_rollout(
            chunks, PROMPTS, local_cfg.model, local_cfg.diffusion, rollout, 12, slots=2,
            generator=torch.Generator().manual_seed(4), stats=stats,
            round_callback=lambda *args, rounds=rounds: rounds.append(args[3]),
        )  # fmt: skip
        assert stats["slots"] == 2 and stats["prefills"] >= 2  # the engine's own schedule
        runs.append((batch, rounds))
    (want, want_rounds), (got, got_rounds) = runs
    assert torch.equal(got.response_tokens, want.response_tokens)
    assert torch.equal(got.decoded_step_map, want.decoded_step_map)
    assert len(got_rounds) == len(want_rounds)
    for ours, theirs in zip(got_rounds, want_rounds, strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def _packed(models, fmt):
    local_cfg, local, _, _ = models
    rollout = generate(local, PROMPTS, local_cfg.model, local_cfg.diffusion, local_cfg.rollout, 12)
    x_t = select_states(
        rollout, "per_block", local_cfg.diffusion.block_size,
        local_cfg.model.student_mask_token_id, 4, torch.Generator().manual_seed(3),
    )  # fmt: skip
    return pack_batch(
        rollout, x_t, local_cfg.model, local_cfg.diffusion, exclude_eos=False, mask_format=fmt
    )


def test_student_and_teacher_rows_equal_dense_path(models):
    _, local, _, flex = models
    dense, columns = _packed(models, "dense"), _packed(models, "columns")
    assert columns.attention_mask.shape == (3, 3, dense.tokens.shape[1])  # O(S), not S x S
    with torch.no_grad():
        for tokens, positions, name in (
            ("tokens", "position_ids", "attention_mask"),
            ("teacher_tokens", "teacher_position_ids", "teacher_attention_mask"),
        ):
            want = local[0](getattr(dense, tokens), getattr(dense, positions), getattr(dense, name))
            got = flex[0](
                getattr(columns, tokens), getattr(columns, positions), getattr(columns, name)
            )
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_training_step_grads_equal_dense_path_with_selective_recompute(models):
    _, local, flex_cfg, flex = models
    assert flex_cfg.precision.recompute == "selective"
    assert all(
        m.checkpoint_core_attention
        for m in flex[0].modules()
        if hasattr(m, "checkpoint_core_attention")
    )
    dense, columns = _packed(models, "dense"), _packed(models, "columns")
    grads = []
    for chunks, packed in ((local, dense), (flex, columns)):
        chunks[0].train()
        chunks[0].zero_grad()
        logits = chunks[0](packed.tokens, packed.position_ids, packed.attention_mask)
        logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in chunks[0].named_parameters()})
        chunks[0].eval()
    for name, want in grads[0].items():
        # gradients reach ~30 (the x30 output layer): ATOL relative to the tensor's scale
        diff = float((grads[1][name] - want).abs().max())
        scale = float(want.abs().max())
        assert diff <= ATOL * max(1.0, scale), (name, diff, scale)
