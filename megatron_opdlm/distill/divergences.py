"""Per-token divergences D(p_T || p_S) between teacher targets and the student, vocab-parallel.

Registry `DIVERGENCES[name](student_logp, targets, cfg, group) -> [n]`: the student's
vocab-parallel log-probs [n, V/tp] (from `vocab_parallel.log_softmax`, so the loss computes them
once and reuses them for its entropy metric), the teacher targets of the same n positions, the
DistillConfig and the TP group. `divergence(name, student_logits, ...)` starts from logits.

Formulas (p_T teacher, p_S student, sums over the whole vocabulary):
- forward_kl: KL(p_T || p_S) = sum p_T (log p_T - log p_S)                (the OPDLM default)
- reverse_kl: KL(p_S || p_T) = sum p_S (log p_S - log p_T)
- mixed_kl:   w * forward_kl + (1 - w) * reverse_kl, w = cfg.mixed_kl_weight
- jsd:        generalised JSD of GKD (Agarwal et al. 2024) with P = teacher, Q = student:
              M = beta p_T + (1 - beta) p_S,
              JSD = beta KL(p_T || M) + (1 - beta) KL(p_S || M), beta = cfg.jsd_beta
- topk_forward_kl: sum over the teacher's top-K ids k of p_T(k) (log p_T(k) - log p_S(k)), with
              log p_S the student's full-softmax log-prob; p_T(k) full-softmax (reference OPDLM)
              or renormalised over the K (cfg.topk_renormalize). K = vocabulary gives forward_kl.
Ids that are not real tokens are -inf in both distributions and contribute exactly 0.

Vocab-parallel: every formula is a sum of elementwise terms of local log-probs, summed locally
and all-reduced once (identity backward); the log-softmax's own backward carries the coupling
between shards (see `vocab_parallel`). No rank ever holds a full-vocabulary tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from megatron_opdlm.config import DistillConfig
from megatron_opdlm.distill import vocab_parallel as vp
from megatron_opdlm.distill.targets import TeacherTargets, topk_from_full

DivergenceFn = Callable[[torch.Tensor, TeacherTargets, DistillConfig, object], torch.Tensor]
DIVERGENCES: dict[str, DivergenceFn] = {}


def register_divergence(name: str):
    def add(fn: DivergenceFn) -> DivergenceFn:
        DIVERGENCES[name] = fn
        return fn

    return add


def _full_teacher(targets: TeacherTargets, name: str) -> torch.Tensor:
    if targets.logprobs is None:
        raise ValueError(
            f"distill.divergence={name} needs the teacher's full distribution but the targets "
            "are sparse top-K; use topk_forward_kl or build the targets without top_k"
        )
    return targets.logprobs


def _safe(student_logp: torch.Tensor, teacher_logp: torch.Tensor):
    """Zero both log-probs where the id is not a token (-inf), so 0 * (-inf) never appears."""
    valid = torch.isfinite(teacher_logp)  # [n, V/tp]; same ids as the student's -inf
    return teacher_logp.masked_fill(~valid, 0.0), student_logp.masked_fill(~valid, 0.0)


def _forward_kl(student_logp, teacher_logp, group) -> torch.Tensor:
    log_t, log_s = _safe(student_logp, teacher_logp)
    terms = teacher_logp.exp() * (log_t - log_s)  # [n, V/tp]
    return vp.all_reduce_sum(terms.sum(dim=-1), group)  # [n]


def _reverse_kl(student_logp, teacher_logp, group) -> torch.Tensor:
    log_t, log_s = _safe(student_logp, teacher_logp)
    terms = student_logp.exp() * (log_s - log_t)  # [n, V/tp]
    return vp.all_reduce_sum(terms.sum(dim=-1), group)


@register_divergence("forward_kl")
def forward_kl(student_logp, targets, cfg, group) -> torch.Tensor:
    return _forward_kl(student_logp, _full_teacher(targets, "forward_kl"), group)


@register_divergence("reverse_kl")
def reverse_kl(student_logp, targets, cfg, group) -> torch.Tensor:
    return _reverse_kl(student_logp, _full_teacher(targets, "reverse_kl"), group)


@register_divergence("mixed_kl")
def mixed_kl(student_logp, targets, cfg, group) -> torch.Tensor:
    teacher_logp = _full_teacher(targets, "mixed_kl")
    w = cfg.mixed_kl_weight
    forward = _forward_kl(student_logp, teacher_logp, group)
    return w * forward + (1.0 - w) * _reverse_kl(student_logp, teacher_logp, group)


@register_divergence("jsd")
def jsd(student_logp, targets, cfg, group) -> torch.Tensor:
    teacher_logp = _full_teacher(targets, "jsd")
    beta = cfg.jsd_beta
    log_t, log_s = _safe(student_logp, teacher_logp)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log(1.0 - beta))  # [n, V/tp]
    terms = beta * teacher_logp.exp() * (log_t - log_m)
    terms = terms + (1.0 - beta) * student_logp.exp() * (log_s - log_m)
    return vp.all_reduce_sum(terms.sum(dim=-1), group)


@register_divergence("topk_forward_kl")
def topk_forward_kl(student_logp, targets, cfg, group) -> torch.Tensor:
    if not targets.is_topk:
        targets = topk_from_full(targets, cfg.top_k, cfg.topk_renormalize, group)
    teacher_topk, ids = targets.topk_logprobs, targets.topk_ids  # [n, K] replicated
    start = vp.vocab_start(student_logp.shape[-1], group)
    student_topk = vp.gather(student_logp, ids, start, group)  # [n, K] replicated
    log_t, log_s = _safe(student_topk, teacher_topk)
    return (teacher_topk.exp() * (log_t - log_s)).sum(dim=-1)  # [n]


def divergence(
    name: str, student_logits: torch.Tensor, targets: TeacherTargets, cfg: DistillConfig, group
) -> torch.Tensor:
    """Per-token D [n] from student logits [n, V/tp] (invalid ids already -inf)."""
    if name not in DIVERGENCES:
        raise ValueError(f"distill.divergence={name!r} is not one of {sorted(DIVERGENCES)}")
    student_logp = vp.log_softmax(vp.upcast(student_logits), group)
    return DIVERGENCES[name](student_logp, targets, cfg, group)


def cross_entropy(student_logp: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """-log p_S(label) [n] from vocab-parallel log-probs [n, V/tp] and global labels [n]."""
    start = vp.vocab_start(student_logp.shape[-1], group)
    return -vp.gather(student_logp, labels[:, None], start, group).squeeze(-1)


@torch.no_grad()
def entropy(logp: torch.Tensor, group) -> torch.Tensor:
    """H(p) [n] from vocab-parallel log-probs [n, V/tp] (or replicated top-K log-probs, group
    None): the entropy of the kept mass only for top-K."""
    terms = logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0.0)
    return -vp.all_reduce_sum(terms.sum(dim=-1), group)
