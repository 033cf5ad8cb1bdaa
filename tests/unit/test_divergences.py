"""Each divergence against a float64 one-process reference written from its formula.

The references drop the invalid vocabulary ids (padding rows, the mask token) by slicing them
away before a plain softmax, an independent route from the library's -inf masking.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opdlm.config import DistillConfig, ModelConfig
from megatron_opdlm.distill import vocab_parallel as vp
from megatron_opdlm.distill.divergences import DIVERGENCES, cross_entropy, divergence, entropy
from megatron_opdlm.distill.targets import TeacherTargets, topk_from_full
from megatron_opdlm.models.vocab import invalid_vocab_mask, mask_invalid_logits

MODEL = ModelConfig(vocab_size=13, vocab_pad_multiple=8)  # padded 16; ids 13 (mask), 14, 15 invalid
V = MODEL.padded_vocab_size
VALID = ~invalid_vocab_mask(MODEL, 0, V)


def reference(name: str, student_logits, teacher_logits, cfg: DistillConfig, valid=VALID):
    """D per position [n] in float64, straight from the formula over the valid ids."""
    log_s = torch.log_softmax(student_logits[:, valid].double(), -1)
    log_t = torch.log_softmax(teacher_logits[:, valid].double(), -1)
    p_s, p_t = log_s.exp(), log_t.exp()
    fwd = (p_t * (log_t - log_s)).sum(-1)
    rev = (p_s * (log_s - log_t)).sum(-1)
    if name == "forward_kl":
        return fwd
    if name == "reverse_kl":
        return rev
    if name == "mixed_kl":
        return cfg.mixed_kl_weight * fwd + (1 - cfg.mixed_kl_weight) * rev
    if name == "jsd":
        beta = cfg.jsd_beta
        m = beta * p_t + (1 - beta) * p_s
        return beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)
    if name == "topk_forward_kl":
        top_t, top_ids = log_t.topk(cfg.top_k, dim=-1)
        if cfg.topk_renormalize:
            top_t = top_t - top_t.logsumexp(-1, keepdim=True)
        return (top_t.exp() * (top_t - log_s.gather(-1, top_ids))).sum(-1)
    raise KeyError(name)


def _inputs(n=6, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(n, V, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = scale * torch.randn(n, V, generator=g, dtype=torch.float64)
    return student, teacher


def _full_targets(teacher_logits):
    return TeacherTargets(logprobs=vp.log_softmax(mask_invalid_logits(teacher_logits, MODEL), None))


CONFIGS = [
    ("forward_kl", DistillConfig()),
    ("reverse_kl", DistillConfig()),
    ("mixed_kl", DistillConfig(mixed_kl_weight=0.3)),
    ("jsd", DistillConfig(jsd_beta=0.5)),
    ("jsd", DistillConfig(jsd_beta=0.2)),
    ("topk_forward_kl", DistillConfig(top_k=4)),
    ("topk_forward_kl", DistillConfig(top_k=4, topk_renormalize=True)),
]


@pytest.mark.parametrize(("name", "cfg"), CONFIGS)
def test_divergence_values_and_gradients_match_the_formula(name, cfg):
    assert set(DIVERGENCES) == {"forward_kl", "reverse_kl", "mixed_kl", "jsd", "topk_forward_kl"}
    student, teacher = _inputs()
    weights = torch.linspace(0.5, 1.5, student.shape[0], dtype=torch.float64)
    value = divergence(name, mask_invalid_logits(student, MODEL), _full_targets(teacher), cfg, None)
    (grad,) = torch.autograd.grad((weights * value).sum(), student)

    ref_student = student.detach().clone().requires_grad_()
    expected = reference(name, ref_student, teacher, cfg)
    (expected_grad,) = torch.autograd.grad((weights * expected).sum(), ref_student)
    # float64 throughout: agreement to rounding error
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert (grad[:, ~VALID] == 0).all()
    assert (value.detach() > -1e-12).all() or name == "topk_forward_kl"


def test_divergences_vanish_when_student_equals_teacher():
    student, _ = _inputs()
    targets = _full_targets(student.detach())
    for name, cfg in CONFIGS:
        value = divergence(name, mask_invalid_logits(student, MODEL), targets, cfg, None)
        if name == "topk_forward_kl" and cfg.topk_renormalize:
            # renormalised top-K vs the full student softmax: sum q (log q - log p) = -log(mass)
            kept = targets.logprobs.topk(cfg.top_k, dim=-1).values.logsumexp(-1)
            torch.testing.assert_close(value, -kept, rtol=1e-12, atol=1e-12)
        else:
            assert value.abs().max() < 1e-12, name


def test_topk_with_k_equal_to_the_vocabulary_is_the_forward_kl():
    student, teacher = _inputs(seed=1)
    targets = _full_targets(teacher)
    logits = mask_invalid_logits(student, MODEL)
    full = divergence("forward_kl", logits, targets, DistillConfig(), None)
    for k in (MODEL.vocab_size, V):  # every real token; the whole padded vocabulary
        for renormalize in (False, True):
            cfg = DistillConfig(top_k=k, topk_renormalize=renormalize)
            sparse = divergence("topk_forward_kl", logits, targets, cfg, None)
            torch.testing.assert_close(sparse, full, rtol=1e-12, atol=1e-12)
            precomputed = topk_from_full(targets, k, renormalize, None)
            again = divergence("topk_forward_kl", logits, precomputed, cfg, None)
            torch.testing.assert_close(again, full, rtol=1e-12, atol=1e-12)


def test_cross_entropy_and_entropy_match_torch():
    student, _ = _inputs(seed=2)
    labels = torch.tensor([0, 3, 12, 5, 7, 1])
    logp = vp.log_softmax(mask_invalid_logits(student, MODEL), None)
    ce = cross_entropy(logp, labels, None)
    expected = torch.nn.functional.cross_entropy(student[:, VALID], labels, reduction="none")
    torch.testing.assert_close(ce, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(ce.sum(), student)
    ref = student.detach().clone().requires_grad_()
    (ref_grad,) = torch.autograd.grad(
        torch.nn.functional.cross_entropy(ref[:, VALID], labels, reduction="sum"), ref
    )
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    ref_logp = torch.log_softmax(student.detach()[:, VALID], -1)
    torch.testing.assert_close(entropy(logp, None), -(ref_logp.exp() * ref_logp).sum(-1))


def test_log_softmax_backward_passes_gradcheck():
    student, _ = _inputs(n=3, seed=3)
    assert torch.autograd.gradcheck(lambda x: vp.log_softmax(x, None), (student,))


def test_full_divergence_refuses_sparse_targets():
    student, teacher = _inputs()
    sparse = topk_from_full(_full_targets(teacher), 4, False, None)
    with pytest.raises(ValueError, match="sparse top-K"):
        divergence("forward_kl", mask_invalid_logits(student, MODEL), sparse, DistillConfig(), None)
    with pytest.raises(ValueError, match="not one of"):
        divergence("kl", student, sparse, DistillConfig(), None)
