"""The distillation loss: targets alignment, normalisation, micro-batching, metrics, zero loss."""

from __future__ import annotations

import pytest
import torch

from megatron_opdlm.config import DiffusionConfig, DistillConfig, ModelConfig
from megatron_opdlm.diffusion.packing import pack_batch, split_micro_batches
from megatron_opdlm.diffusion.states import select_states
from megatron_opdlm.distill.loss import distill_loss, summarize_metrics
from megatron_opdlm.distill.targets import teacher_targets
from megatron_opdlm.models.vocab import invalid_vocab_mask
from tests.unit.test_divergences import reference
from tests.unit.test_states import make_rollout

MODEL = ModelConfig(vocab_size=45, vocab_pad_multiple=8, eos_token_ids=[1], pad_token_id=0)
V = MODEL.padded_vocab_size  # 48; ids 45 (mask), 46, 47 are not tokens
VALID = ~invalid_vocab_mask(MODEL, 0, V)
MASK = MODEL.student_mask_token_id


def _batch(seed=0, block=4, shift=False, exclude_eos=False, mode="per_block"):
    rollout = make_rollout([3, 5, 2, 4], [12, 7, 8, 3], 5, 12, block, 4, vocab=45, seed=seed)
    x_t = select_states(rollout, mode, block, MASK, 4, torch.Generator().manual_seed(seed))
    diffusion = DiffusionConfig(block_size=block, token_shift=shift)
    return pack_batch(rollout, x_t, MODEL, diffusion, exclude_eos)


def _logits(packed, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, s = packed.tokens.shape
    student = 2 * torch.randn(b, s, V, generator=g, dtype=torch.float64)
    teacher = 2 * torch.randn(
        b, packed.teacher_tokens.shape[1], V, generator=g, dtype=torch.float64
    )
    return student.requires_grad_(), teacher


def _reference_per_token(name, cfg, student, teacher, packed):
    """[b, R] per-position divergence by explicit columns (0 off the loss mask)."""
    b, r, p = packed.batch_size, packed.response_length, packed.prompt_length
    out = torch.zeros(b, r, dtype=torch.float64)
    for i in range(b):
        for j in range(r):
            if packed.loss_mask[i, j]:
                s_col, t_col = int(packed.logit_columns[j]), p + j - 1
                s, t = student[i, s_col][None], teacher[i, t_col][None]
                out[i, j] = reference(name, s, t, cfg, VALID)[0]
    return out


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("name", ["forward_kl", "jsd", "topk_forward_kl"])
def test_global_token_loss_equals_the_formula(name, shift):
    packed = _batch(shift=shift)
    student, teacher = _logits(packed)
    cfg = DistillConfig(divergence=name, top_k=5)
    n_global = packed.num_loss_tokens + 7  # other micro-batches / ranks hold 7 more
    top_k = 5 if name == "topk_forward_kl" else None
    targets = teacher_targets(teacher, packed, MODEL, top_k=top_k, group=None)
    loss, metrics = distill_loss(
        student, targets, packed, cfg, n_global, model_cfg=MODEL, group=None
    )
    (grad,) = torch.autograd.grad(loss, student)

    ref_student = student.detach().clone().requires_grad_()
    per_token = _reference_per_token(name, cfg, ref_student, teacher, packed)
    expected = per_token.sum() / n_global
    (expected_grad,) = torch.autograd.grad(expected, ref_student)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)  # float64
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert metrics["loss_tokens"] == packed.num_loss_tokens
    # logits handed over at the logit columns only give the same loss
    at_columns = student.detach()[:, packed.logit_columns]
    again, _ = distill_loss(at_columns, targets, packed, cfg, n_global, model_cfg=MODEL, group=None)
    torch.testing.assert_close(again, loss.detach(), rtol=0, atol=0)


def test_sequence_mean_and_mdlm_cross_entropy():
    packed = _batch(seed=1)
    student, teacher = _logits(packed, seed=1)
    targets = teacher_targets(teacher, packed, MODEL, group=None)
    per_token = _reference_per_token(
        "forward_kl", DistillConfig(), student.detach(), teacher, packed
    )
    counts = packed.loss_mask.sum(1)
    n_seq = packed.num_loss_sequences + 2
    expected = (per_token.sum(1) / counts.clamp(min=1)).sum() / n_seq
    cfg = DistillConfig(normalization="sequence_mean")
    loss, _ = distill_loss(
        student, targets, packed, cfg, 1, model_cfg=MODEL, num_global_sequences=n_seq, group=None
    )
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)

    cfg = DistillConfig(mode="mdlm_sft")
    loss, _ = distill_loss(student, None, packed, cfg, 11, model_cfg=MODEL, group=None)
    rows, cols = packed.loss_mask.nonzero(as_tuple=True)
    logits = student.detach()[rows, packed.logit_columns[cols]][:, VALID]
    ce = torch.nn.functional.cross_entropy(logits, packed.x0[rows, cols], reduction="sum")
    torch.testing.assert_close(loss, ce / 11, rtol=1e-10, atol=1e-12)


def test_teacher_targets_are_the_next_token_distribution_at_the_previous_column():
    packed = _batch(seed=2)
    _, teacher = _logits(packed, seed=2)
    full = teacher_targets(teacher, packed, MODEL, group=None)
    p = packed.prompt_length
    expected = torch.log_softmax(teacher[:, p - 1 : -1][..., VALID], -1)  # [b, R, valid]
    torch.testing.assert_close(full.logprobs[..., VALID], expected, rtol=1e-12, atol=1e-12)
    assert torch.isneginf(full.logprobs[..., ~VALID]).all()
    for renormalize in (False, True):
        sparse = teacher_targets(
            teacher, packed, MODEL, top_k=6, renormalize=renormalize, group=None
        )
        values, ids = full.logprobs.topk(6, dim=-1)
        if renormalize:
            values = values - values.logsumexp(-1, keepdim=True)
        assert torch.equal(sparse.topk_ids, ids)
        torch.testing.assert_close(sparse.topk_logprobs, values, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="expected"):
        teacher_targets(teacher[:, 1:], packed, MODEL, group=None)


def test_micro_batches_sum_to_the_full_batch_loss_and_gradient():
    packed = _batch(seed=3)
    student, teacher = _logits(packed, seed=3)
    cfg = DistillConfig()
    targets = teacher_targets(teacher, packed, MODEL, group=None)
    n = packed.num_loss_tokens
    full, _ = distill_loss(student, targets, packed, cfg, n, model_cfg=MODEL, group=None)
    (full_grad,) = torch.autograd.grad(full, student)

    # the trainer's contract: each micro-batch's loss is divided by the step's token count n,
    # the schedule does not rescale (calculate_per_token_loss) and gradients are summed
    parts, metrics = split_micro_batches(packed, 2), []
    grad = torch.zeros_like(student)
    for index, part in enumerate(parts):
        rows = slice(2 * index, 2 * index + 2)
        piece = student.detach()[rows].clone().requires_grad_()
        part_targets = targets.rows(2 * index, 2 * index + 2)
        loss, m = distill_loss(piece, part_targets, part, cfg, n, model_cfg=MODEL, group=None)
        (grad[rows],) = torch.autograd.grad(loss, piece)
        metrics.append(m)
    total = sum(m["loss"] for m in metrics)
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, full_grad, rtol=1e-12, atol=1e-14)
    assert summarize_metrics(metrics)["loss"] == pytest.approx(full.item(), rel=1e-12)


def test_metrics_and_an_empty_micro_batch():
    packed = _batch(seed=4)
    student, teacher = _logits(packed, seed=4)
    targets = teacher_targets(teacher, packed, MODEL, group=None)
    n = packed.num_loss_tokens
    loss, metrics = distill_loss(
        student, targets, packed, DistillConfig(), n, model_cfg=MODEL, group=None
    )
    summary = summarize_metrics([metrics])
    masked = ((packed.x_t == MASK) & packed.response_valid).sum() / packed.response_valid.sum()
    assert summary["masked_fraction"] == pytest.approx(masked.item())
    assert summary["divergence"] == pytest.approx(loss.item())  # normalised by its own n
    buckets = sum(metrics[f"tokens_ratio{b}"] for b in ("0-25", "25-50", "50-75", "75-100"))
    assert buckets == n
    parts = sum(metrics[f"divergence_sum_ratio{b}"] for b in ("0-25", "25-50", "50-75", "75-100"))
    torch.testing.assert_close(parts, metrics["divergence_sum"])
    rows, cols = packed.loss_mask.nonzero(as_tuple=True)
    ref_t = torch.log_softmax(teacher[rows, packed.prompt_length + cols - 1][:, VALID], -1)
    assert summary["teacher_entropy"] == pytest.approx(-(ref_t.exp() * ref_t).sum(-1).mean().item())
    assert summary["student_entropy"] > 0

    packed.loss_mask[:] = False  # e.g. a micro-batch of finished rows
    empty, _ = distill_loss(
        student, targets, packed, DistillConfig(), n, model_cfg=MODEL, group=None
    )
    (grad,) = torch.autograd.grad(empty, student)
    assert empty.item() == 0 and (grad == 0).all()


def _sampler_rollout(student, config, generator):
    from megatron_opdlm.diffusion.sampler import generate

    prompts = [[5, 9, 17], [33, 8, 21, 40, 6, 2]]
    return generate(student, prompts, config.model, config.diffusion, config.rollout,
                    max_new_tokens=8, generator=generator)  # fmt: skip


@pytest.mark.parametrize("source", ["hand_built", "sampler"])
def test_loss_is_zero_when_the_student_is_the_teacher_with_block_one_and_token_shift(
    single_process, source
):
    from megatron_opdlm.models.builder import build_student, build_teacher, copy_weights
    from tests.tiny import tiny_config

    config = tiny_config(
        "diffusion.block_size=1", "rollout.steps_per_block=1", "diffusion.token_shift=true",
        "rollout.temperature=1.0",
    )  # fmt: skip
    teacher, student = build_teacher(config), build_student(config)
    copy_weights(teacher, student)
    g = torch.Generator().manual_seed(0)
    if source == "sampler":
        rollout = _sampler_rollout(student, config, g)
    else:
        rollout = make_rollout([3, 6], [7, 5], 6, 8, 1, 1, vocab=120, seed=5)
    mask_id = config.model.student_mask_token_id
    x_t = select_states(rollout, "per_block", 1, mask_id, 1, g)
    losses = {}
    for shift in (True, False):
        diffusion = DiffusionConfig(block_size=1, token_shift=shift)
        packed = pack_batch(rollout, x_t, config.model, diffusion, exclude_eos=False)
        assert packed.num_loss_tokens > 0
        with torch.no_grad():
            teacher_logits = teacher[0](
                packed.teacher_tokens, packed.teacher_position_ids, packed.teacher_attention_mask
            )
            student_logits = student[0](packed.tokens, packed.position_ids, packed.attention_mask)
        targets = teacher_targets(teacher_logits, packed, config.model)
        for name in ("forward_kl", "reverse_kl", "jsd", "topk_forward_kl"):
            cfg = DistillConfig(divergence=name)
            loss, _ = distill_loss(
                student_logits, targets, packed, cfg, packed.num_loss_tokens, model_cfg=config.model
            )
            losses[shift, name] = loss.item()
    for name in ("forward_kl", "reverse_kl", "jsd", "topk_forward_kl"):
        assert abs(losses[True, name]) < 1e-6, (name, losses[True, name])
    # without the shift the student reads its own (mask-token) column: far from the teacher
    assert losses[False, "forward_kl"] > 1e-3


def test_target_options_follow_the_divergence():
    from megatron_opdlm.distill.targets import target_options

    cfg = DistillConfig(divergence="topk_forward_kl", top_k=16, topk_renormalize=True)
    assert target_options(cfg) == {"top_k": 16, "renormalize": True}
    assert target_options(DistillConfig(divergence="jsd")) == {"top_k": None, "renormalize": False}
