"""Teacher targets from one causal forward over [prompt | x0].

The target for response position r is the teacher's next-token distribution at column P + r - 1,
p_AR(. | prompt, x0_<r). Ids that are not real tokens (vocabulary padding, the student's mask
token; `models.vocab.mask_invalid_logits`) are excluded from every softmax.

Two forms, both vocab-parallel:
- full: log-probs [b, R, V/tp], each rank its own shard (what forward/reverse KL and JSD need);
- sparse top-K: the teacher's K most likely tokens, log-probs [b, R, K] and global ids [b, R, K],
  the same on every TP rank. By default the log-probs are the full-softmax ones (the reference
  OPDLM's choice: the kept mass is below 1); `renormalize=True` renormalises them over the K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_opdlm.config import DistillConfig, ModelConfig
from megatron_opdlm.diffusion.packing import PackedBatch
from megatron_opdlm.distill import vocab_parallel
from megatron_opdlm.models.vocab import mask_invalid_logits


@dataclass
class TeacherTargets:
    """Teacher log-probs at response positions; leading dims [b, R] (or [n] after `select`)."""

    logprobs: torch.Tensor | None = None  # [..., V/tp] float32, this rank's vocabulary shard
    topk_logprobs: torch.Tensor | None = None  # [..., K] float32, replicated over TP
    topk_ids: torch.Tensor | None = None  # [..., K] long, global vocabulary ids
    renormalized: bool = False  # topk_logprobs renormalised over the K tokens

    @property
    def is_topk(self) -> bool:
        return self.topk_logprobs is not None

    def _map(self, fn) -> TeacherTargets:
        return TeacherTargets(
            logprobs=None if self.logprobs is None else fn(self.logprobs),
            topk_logprobs=None if self.topk_logprobs is None else fn(self.topk_logprobs),
            topk_ids=None if self.topk_ids is None else fn(self.topk_ids),
            renormalized=self.renormalized,
        )

    def select(self, positions: torch.Tensor) -> TeacherTargets:
        """Keep the positions where the [b, R] bool mask is True: leading dims become [n]."""
        return self._map(lambda t: t[positions])

    def rows(self, start: int, end: int) -> TeacherTargets:
        return self._map(lambda t: t[start:end])

    def to(self, device) -> TeacherTargets:
        return self._map(lambda t: t.to(device))


def target_options(cfg: DistillConfig) -> dict:
    """teacher_targets keyword arguments for a DistillConfig: sparse only for topk_forward_kl."""
    if cfg.divergence == "topk_forward_kl":
        return {"top_k": cfg.top_k, "renormalize": cfg.topk_renormalize}
    return {"top_k": None, "renormalize": False}


@torch.no_grad()
def teacher_targets(
    teacher_logits_local: torch.Tensor,  # [b, P + R, V/tp]
    packed: PackedBatch,
    model_cfg: ModelConfig,
    top_k: int | None = None,
    renormalize: bool = False,
    group="default",
) -> TeacherTargets:
    """Targets for every response position of `packed` (see the module docstring).

    `group`: the TP group ("default" = Megatron's, None = no tensor parallelism).
    """
    group = vocab_parallel.default_tp_group() if group == "default" else group
    b, p, r = packed.batch_size, packed.prompt_length, packed.response_length
    if teacher_logits_local.dim() != 3 or teacher_logits_local.shape[:2] != (b, p + r):
        raise ValueError(
            f"teacher logits of shape {tuple(teacher_logits_local.shape)}; expected "
            f"[{b}, {p + r}, V/tp] from a forward over packed.teacher_tokens"
        )
    if p < 1:
        raise ValueError("teacher targets need a prompt: token 0 is predicted from column P - 1")
    columns = torch.arange(p - 1, p + r - 1, device=teacher_logits_local.device)  # [R]
    logits = vocab_parallel.upcast(teacher_logits_local[:, columns])  # [b, R, V/tp]
    width = logits.shape[-1]
    start = vocab_parallel.vocab_start(width, group)
    logits = mask_invalid_logits(logits, model_cfg, start)
    logprobs = vocab_parallel.log_softmax(logits.view(b * r, width), group)  # [b*R, V/tp]
    if top_k is None:
        return TeacherTargets(logprobs=logprobs.view(b, r, width))
    values, ids = vocab_parallel.topk(logprobs, top_k, start, group)  # [b*R, K]
    if renormalize:
        values = values - values.logsumexp(dim=-1, keepdim=True)
    return TeacherTargets(
        topk_logprobs=values.view(b, r, top_k),
        topk_ids=ids.view(b, r, top_k),
        renormalized=renormalize,
    )


@torch.no_grad()
def topk_from_full(targets: TeacherTargets, k: int, renormalize: bool, group) -> TeacherTargets:
    """Sparse top-K targets derived from full ones (same result as `teacher_targets(top_k=k)`)."""
    full = targets.logprobs  # [..., V/tp]
    lead, width = full.shape[:-1], full.shape[-1]
    start = vocab_parallel.vocab_start(width, group)
    values, ids = vocab_parallel.topk(full.reshape(-1, width), k, start, group)
    if renormalize:
        values = values - values.logsumexp(dim=-1, keepdim=True)
    return TeacherTargets(
        topk_logprobs=values.view(*lead, k), topk_ids=ids.view(*lead, k), renormalized=renormalize
    )
