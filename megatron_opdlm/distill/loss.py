"""The distillation loss of one micro-batch, its metrics, and its shape for Megatron's schedules.

Normalisation (cfg.normalization):
- global_tokens: loss = sum of D over this micro-batch's loss tokens / N, N = loss tokens of the
  whole optimizer step over all micro-batches and data-parallel ranks. Summing the micro-batch
  losses (and gradients) over micro-batches and DP ranks gives the global token mean, whatever
  the split.
- sequence_mean (the paper's): each sequence's mean D over its loss tokens, summed and divided by
  the number of sequences with a loss token in the step (`num_global_sequences`).

The trainer's contract (the only one): the loss of a micro-batch is already divided by N (or
the sequence count), Megatron's schedule runs with `calculate_per_token_loss=True` so it does not
divide by the number of micro-batches, and DDP sums gradients over DP ranks
(`training.optimizer`).

Metrics are detached sums and counts (so they aggregate exactly over micro-batches and ranks);
`summarize_metrics` turns a list of them into means: divergence, masked fraction, divergence by
masking-ratio bucket (the masked fraction of the token's block: (0, .25], (.25, .5], (.5, .75],
(.75, 1]), teacher and student entropy (of the kept top-K mass when the targets are sparse).
"""

from __future__ import annotations

import torch

from megatron_opdlm.config import DistillConfig, ModelConfig
from megatron_opdlm.diffusion.packing import PackedBatch
from megatron_opdlm.diffusion.states import mask_ratio_per_position
from megatron_opdlm.distill import vocab_parallel as vp
from megatron_opdlm.distill.divergences import DIVERGENCES, cross_entropy, entropy
from megatron_opdlm.distill.targets import TeacherTargets
from megatron_opdlm.models.vocab import mask_invalid_logits

BUCKETS = ("0-25", "25-50", "50-75", "75-100")


def student_logits_at_loss_positions(
    student_logits_local: torch.Tensor, packed: PackedBatch
) -> torch.Tensor:
    """[b, S, V/tp] (whole packed row) or [b, R, V/tp] (at logit columns) -> [n, V/tp]."""
    b, s, r = packed.batch_size, packed.tokens.shape[1], packed.response_length
    if student_logits_local.dim() != 3 or student_logits_local.shape[0] != b:
        raise ValueError(
            f"student logits {tuple(student_logits_local.shape)}: expected [{b}, S|R, V/tp]"
        )
    rows, cols = packed.loss_mask.nonzero(as_tuple=True)  # [n], [n]
    if student_logits_local.shape[1] == s:
        return student_logits_local[rows, packed.logit_columns.to(cols.device)[cols]]
    if student_logits_local.shape[1] == r:
        return student_logits_local[rows, cols]
    raise ValueError(
        f"student logits have {student_logits_local.shape[1]} columns; expected the packed row "
        f"({s}) or the response at logit columns ({r})"
    )


def distill_loss(
    student_logits_local: torch.Tensor,
    targets: TeacherTargets | None,
    packed: PackedBatch,
    cfg: DistillConfig,
    num_global_loss_tokens: int,
    *,
    model_cfg: ModelConfig,
    num_global_sequences: int | None = None,
    group="default",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss scalar, metrics) of one micro-batch; see the module docstring.

    `targets` may be None only for mode mdlm_sft (cross-entropy on x0). `group`: the TP group
    ("default" = Megatron's, None = no tensor parallelism).
    """
    group = vp.default_tp_group() if group == "default" else group
    if cfg.normalization == "sequence_mean" and not num_global_sequences:
        raise ValueError("distill.normalization=sequence_mean needs num_global_sequences >= 1")
    if cfg.normalization == "global_tokens" and num_global_loss_tokens < 1:
        raise ValueError(
            f"num_global_loss_tokens={num_global_loss_tokens}: the optimizer step has no loss "
            "token (skip it instead of dividing by zero)"
        )
    logits = vp.upcast(student_logits_at_loss_positions(student_logits_local, packed))  # [n, V/tp]
    start = vp.vocab_start(logits.shape[-1], group)
    student_logp = vp.log_softmax(mask_invalid_logits(logits, model_cfg, start), group)
    selected = packed.loss_mask  # [b, R]
    if cfg.mode == "mdlm_sft":
        per_token = cross_entropy(student_logp, packed.x0[selected], group)  # [n]
        teacher = None
    else:
        if targets is None:
            raise ValueError(f"distill.mode={cfg.mode} needs teacher targets")
        if cfg.divergence not in DIVERGENCES:
            raise ValueError(
                f"distill.divergence={cfg.divergence!r} is not one of {sorted(DIVERGENCES)}"
            )
        teacher = targets.select(selected)
        per_token = DIVERGENCES[cfg.divergence](student_logp, teacher, cfg, group)  # [n]

    if cfg.normalization == "global_tokens":
        loss = per_token.sum() / num_global_loss_tokens
    else:
        rows = selected.nonzero(as_tuple=True)[0]  # [n]
        per_row = torch.zeros(packed.batch_size, dtype=per_token.dtype, device=per_token.device)
        per_row = per_row.index_add(0, rows, per_token)  # [b]
        counts = selected.sum(dim=1).clamp(min=1)  # [b]
        loss = (per_row / counts).sum() / num_global_sequences
    metrics = _metrics(loss, per_token, student_logp, teacher, packed, group)
    return loss, metrics


@torch.no_grad()
def _metrics(loss, per_token, student_logp, teacher, packed, group) -> dict[str, torch.Tensor]:
    selected = packed.loss_mask
    masked = packed.masked  # [b, R]
    per_token = per_token.detach()  # float32 or wider (the loss dtype)
    dtype = per_token.dtype
    metrics = {
        "loss": loss.detach().clone(),
        "divergence_sum": per_token.sum(),
        "loss_tokens": per_token.new_tensor(float(per_token.numel())),
        "masked_tokens": masked.sum().to(dtype),
        "response_tokens": packed.response_valid.sum().to(dtype),
        "student_entropy_sum": entropy(student_logp.detach(), group).sum(),
    }
    if teacher is not None:
        if teacher.is_topk:
            metrics["teacher_entropy_sum"] = entropy(teacher.topk_logprobs, None).sum().to(dtype)
        else:
            metrics["teacher_entropy_sum"] = entropy(teacher.logprobs, group).sum().to(dtype)
    ratio = mask_ratio_per_position(masked, packed.response_valid, packed.block_size)[selected]
    bucket = (ratio * len(BUCKETS)).ceil().long().clamp(1, len(BUCKETS)) - 1  # [n]
    for index, name in enumerate(BUCKETS):
        in_bucket = bucket == index
        metrics[f"divergence_sum_ratio{name}"] = per_token[in_bucket].sum()
        metrics[f"tokens_ratio{name}"] = in_bucket.sum().to(dtype)
    return metrics


def metric_keys(with_teacher: bool) -> list[str]:
    """The keys of every metric dict `distill_loss` returns, sorted (the same on every rank, so
    ranks without a loss can take part in a reduction of them)."""
    keys = ["loss", "divergence_sum", "loss_tokens", "masked_tokens", "response_tokens",
            "student_entropy_sum"]  # fmt: skip
    if with_teacher:
        keys.append("teacher_entropy_sum")
    for name in BUCKETS:
        keys += [f"divergence_sum_ratio{name}", f"tokens_ratio{name}"]
    return sorted(keys)


def metric_totals(metric_dicts: list[dict[str, torch.Tensor]], keys: list[str]) -> list[float]:
    """Sums over micro-batches of each key in `keys` (float64, one device-to-host copy)."""
    if not metric_dicts:
        return [0.0] * len(keys)
    for metrics in metric_dicts:
        if sorted(metrics) != keys:
            raise ValueError(f"metric keys {sorted(metrics)} differ from the expected {keys}")
    stacked = torch.stack(
        [torch.stack([m[k].detach().double() for k in keys]) for m in metric_dicts]
    )
    return stacked.sum(0).cpu().tolist()  # [len(keys)]


def summarize_metrics(metric_dicts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Means over micro-batches (a list of metric dicts, e.g. one per micro-batch)."""
    if not metric_dicts:
        return {}
    keys = sorted(metric_dicts[0])
    return summarize_totals(dict(zip(keys, metric_totals(metric_dicts, keys))))


def summarize_totals(total: dict[str, float]) -> dict[str, float]:
    """Means from summed metrics (over micro-batches and, once reduced, over ranks)."""

    def mean(num: str, den: str) -> float:
        return total[num] / total[den] if total[den] else float("nan")

    out = {
        "loss": total["loss"],
        "divergence": mean("divergence_sum", "loss_tokens"),
        "loss_tokens": total["loss_tokens"],
        "masked_fraction": mean("masked_tokens", "response_tokens"),
        "student_entropy": mean("student_entropy_sum", "loss_tokens"),
    }
    if "teacher_entropy_sum" in total:
        out["teacher_entropy"] = mean("teacher_entropy_sum", "loss_tokens")
    for name in BUCKETS:
        out[f"divergence_ratio{name}"] = mean(f"divergence_sum_ratio{name}", f"tokens_ratio{name}")
    return out
