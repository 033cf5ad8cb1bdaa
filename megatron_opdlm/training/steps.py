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
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_opdlm.config import JobConfig
from megatron_opdlm.diffusion.packing import PackedBatch
from megatron_opdlm.distill.loss import distill_loss
from megatron_opdlm.distill.targets import TeacherTargets, teacher_targets


def _project_rows(*, hidden_states, output_layer, output_weight, context, scale_logits, **_):
    """GPTModel output_processor: the vocab projection of the rows in `context` only.

    hidden_states [s, b, h] -> logits [b, n, V/tp] (vocab-parallel, not gathered). The loss
    reads R of the S = P + 2R student columns and R of the P + R teacher columns: projecting only
    those skips most of the output layer's FLOPs and its [b, S, V] activations.
    """
    rows = context  # [n] long
    logits, _ = output_layer(
        hidden_states.index_select(0, rows), weight=output_weight, runtime_gather_output=False
    )  # [n, b, V/tp]
    return scale_logits(logits).transpose(0, 1).contiguous()  # [b, n, V/tp]


def _projection(job: JobConfig, rows: torch.Tensor) -> dict:
    """forward kwargs that project only `rows` (not under sequence parallelism, where the
    output layer gathers the sequence itself: there the whole row is projected)."""
    if job.parallel.sequence_parallel:
        return {}
    return {"output_processor": _project_rows, "output_processor_context": rows}


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

    def forward_step(data_iterator, model):
        micro = next(data_iterator)
        p, r = micro.prompt_length, micro.response_length
        # Columns P-1 .. P+R-1 (R + 1 rows; the last is not read): targets read P-1 .. P+R-2.
        rows = torch.arange(p - 1, p + r, device=micro.teacher_tokens.device)
        projection = _projection(job, rows)
        output = model(
            micro.teacher_tokens, micro.teacher_position_ids, micro.teacher_attention_mask,
            **projection,
        )  # fmt: skip
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
        seq_length=first.teacher_tokens.shape[1],
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

    def forward_step(data_iterator, model):
        micro, micro_targets = next(data_iterator)
        projection = _projection(job, micro.logit_columns.to(micro.tokens.device))
        output = model(micro.tokens, micro.position_ids, micro.attention_mask, **projection)

        def loss_func(logits):  # [b, R, V/tp] at the logit columns (or [b, S, V/tp])
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
        seq_length=first.tokens.shape[1],
        micro_batch_size=first.batch_size,
        forward_only=forward_only,
    )
