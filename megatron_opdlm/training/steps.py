"""Teacher and student passes through Megatron's forward-backward schedules.

Both run their micro-batches through `get_forward_backward_func()`, so pipeline parallelism
(1F1B, interleaved with virtual stages) works the same for the frozen teacher (forward_only) and
the student. Targets and losses exist on the last pipeline stage only, which is where the
student's loss is computed: teacher and student share the layout (colocated).

The student's loss function returns (loss, num_tokens, metrics) with the loss already divided by
the step's global loss-token count; `calculate_per_token_loss` is set on the student config (see
`training.optimizer`), so the schedule adds micro-batch losses without rescaling them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_opdlm.config import JobConfig
from megatron_opdlm.diffusion.packing import PackedBatch
from megatron_opdlm.distill.loss import distill_loss
from megatron_opdlm.distill.targets import TeacherTargets, teacher_targets
from megatron_opdlm.models.builder import fp8_for
from megatron_opdlm.models.projection import project_rows_vocab_parallel
from megatron_opdlm.runtime import te_support


def _projection(rows: torch.Tensor) -> dict:
    """forward kwargs that project only `rows` (vocab-parallel logits [b, n, V/tp]); works with
    and without sequence parallelism (`models.projection`)."""
    return {"output_processor": project_rows_vocab_parallel, "output_processor_context": rows}


def row_multiple(job: JobConfig, role: str) -> int:
    """The multiple `role`'s packed rows are padded to: TP under sequence parallelism (the
    sequence is split over TP ranks), times TE's FP8 GEMM row alignment when `role` runs FP8."""
    multiple = job.parallel.tp if job.parallel.sequence_parallel else 1
    if fp8_for(role, job.precision):
        multiple *= te_support.fp8_row_multiple(job.precision.fp8_recipe)
    return multiple


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def pad_columns(
    tokens: torch.Tensor,  # [b, s] long
    position_ids: torch.Tensor,  # [b, s] long
    attention_mask: torch.Tensor,  # [b, 1, s, s] bool, True = masked out
    multiple: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a packed row to a multiple of `multiple` columns, exactly: no real query sees a
    pad key (masked columns) and pad queries are never read (the projection takes real rows)."""
    s = tokens.shape[1]
    extra = padded_length(s, multiple) - s
    if extra == 0:
        return tokens, position_ids, attention_mask
    tokens = F.pad(tokens, (0, extra), value=0)  # [b, s + e]
    position_ids = F.pad(position_ids, (0, extra), value=0)  # [b, s + e]
    attention_mask = F.pad(attention_mask, (0, extra, 0, extra), value=True)  # [b,1,s+e,s+e]
    return tokens, position_ids, attention_mask


def _iterators(items: list, num_chunks: int):
    """One iterator per model chunk (the interleaved schedule pulls from each chunk's own)."""
    if num_chunks == 1:
        return iter(items)
    return [iter(items) for _ in range(num_chunks)]


def targets_are_finite(targets: TeacherTargets) -> bool:
    """No NaN and no +inf in the teacher's log-probs (-inf is legal: ids that are not tokens)."""
    values = targets.logprobs if targets.logprobs is not None else targets.topk_logprobs
    return not bool(torch.isnan(values).any() or torch.isposinf(values).any())


def teacher_top_k(job: JobConfig) -> int | None:
    return job.distill.top_k if job.distill.divergence == "topk_forward_kl" else None


@torch.no_grad()
def run_teacher(
    teacher_chunks: list[torch.nn.Module],
    micro_batches: list[PackedBatch],
    job: JobConfig,
    top_k: int | None,
) -> list[TeacherTargets] | None:
    """Teacher targets per micro-batch on the last pipeline stage (None on other stages)."""

    multiple = row_multiple(job, "teacher")

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        p, r = micro.prompt_length, micro.response_length
        # Columns P-1 .. P+R-1 (R + 1 rows; the last is not read): targets read P-1 .. P+R-2.
        rows = torch.arange(p - 1, p + r, device=micro.teacher_tokens.device)
        # The explicit causal + left-padding mask [b, 1, P+R, P+R]: honoured under the teacher's
        # mask type for every impl (models.specs.attention_mask_type).
        tokens, positions, mask = pad_columns(
            micro.teacher_tokens, micro.teacher_position_ids, micro.teacher_attention_mask, multiple
        )
        projection = _projection(rows)
        output = model(tokens, positions, mask, **projection)
        # With the projection the logits start at column P-1: seen as a row with a 1-token prompt.
        view = dataclasses.replace(micro, prompt_length=1) if projection else micro

        def collect(logits):  # [b, R + 1, V/tp] (projected) or [b, P + R, V/tp]
            targets = teacher_targets(logits, view, job.model, top_k, job.distill.topk_renormalize)
            return logits.new_zeros(()), {"targets": targets}

        return output, collect

    first = micro_batches[0]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=_iterators(micro_batches, len(teacher_chunks)),
        model=teacher_chunks,
        num_microbatches=len(micro_batches),
        seq_length=padded_length(first.teacher_tokens.shape[1], multiple),
        micro_batch_size=first.batch_size,
        forward_only=True,
    )
    if not outputs:
        return None
    return [out["targets"] for out in outputs]


def run_student(
    student_chunks: list[torch.nn.Module],
    micro_batches: list[PackedBatch],
    targets: list[TeacherTargets] | None,
    job: JobConfig,
    num_global_loss_tokens: int,
    num_global_sequences: int,
    forward_only: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Student forward (and backward) over the micro-batches; metric dicts on the last stage."""
    per_micro = targets if targets is not None else [None] * len(micro_batches)
    multiple = row_multiple(job, "student")

    def forward_step(data_iterator, model):
        micro, micro_targets = next(data_iterator)
        tokens, positions, mask = pad_columns(
            micro.tokens, micro.position_ids, micro.attention_mask, multiple
        )
        projection = _projection(micro.logit_columns.to(micro.tokens.device))
        output = model(tokens, positions, mask, **projection)

        def loss_func(logits):  # [b, R, V/tp] at the logit columns (or [b, S, V/tp] unprojected)
            loss, metrics = distill_loss(
                logits, micro_targets, micro, job.distill, num_global_loss_tokens,
                model_cfg=job.model, num_global_sequences=num_global_sequences,
            )  # fmt: skip
            num_tokens = torch.tensor(micro.num_loss_tokens, dtype=torch.int, device=loss.device)
            return loss, num_tokens, metrics

        return output, loss_func

    first = micro_batches[0]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=_iterators(list(zip(micro_batches, per_micro)), len(student_chunks)),
        model=student_chunks,
        num_microbatches=len(micro_batches),
        seq_length=padded_length(first.tokens.shape[1], multiple),
        micro_batch_size=first.batch_size,
        forward_only=forward_only,
    )
