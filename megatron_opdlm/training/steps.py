"""One optimizer step's teacher and student passes through ONE Megatron forward-backward schedule.

The teacher's targets are produced and consumed per micro-batch: each pipeline stage's model chunk
for the schedule is a `StagePair`, the student chunk with the frozen teacher chunk of the same
stage beside it (teacher and student share the layout: colocated). A micro-batch's forward runs
the teacher (no grad, eval mode, its own config: dtype and FP8 rules) and then the student; the
activation sent between stages is the two hidden states concatenated along the sequence,
[T + S, b, h] with T and S the teacher's and the student's padded row lengths (under sequence
parallelism each rank's shard [T/tp + S/tp, b, h] is [teacher shard ; student shard]). On the last
stage the teacher's projected rows become that micro-batch's TeacherTargets, read by its loss and
dropped with its backward: the schedule holds targets of the micro-batches in flight on the last
stage (one for 1F1B and the interleaved schedule, whose last stage runs each backward right
after its forward), not of the whole step. The backward sends zeros for the teacher's rows.

Modes without a teacher pass (mdlm_sft) run the plain student chunks. Targets and losses exist
on the last pipeline stage only.

The student's loss function returns (loss, num_tokens, metrics) with the loss already divided by
the step's global loss-token count; `calculate_per_token_loss` is set on the student config (see
`training.optimizer`), so the schedule adds micro-batch losses without rescaling them.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_attr_wrapped_model

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


def iterators(items: list, num_chunks: int):
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


@dataclasses.dataclass
class StepOutput:
    """What one schedule call leaves on this rank."""

    metrics: list[dict[str, torch.Tensor]]  # one dict per micro-batch, last pipeline stage only
    teacher_finite: bool = True  # every teacher target of this rank was finite (True: none here)


@torch.no_grad()
def teacher_forward(
    chunk: torch.nn.Module, micro: PackedBatch, job: JobConfig, top_k: int | None
) -> tuple[torch.Tensor | None, TeacherTargets | None]:
    """One teacher micro-batch on this stage: (hidden states [T(/tp), b, h], None) before the
    last stage, (None, targets) on it. T = the teacher row P + R padded to `row_multiple`."""
    p, r = micro.prompt_length, micro.response_length
    # Columns P-1 .. P+R-1 (R + 1 rows; the last is not read): targets read P-1 .. P+R-2.
    rows = torch.arange(p - 1, p + r, device=micro.teacher_tokens.device)
    # The explicit causal + left-padding mask [b, 1, P+R, P+R]: honoured under the teacher's
    # mask type for every impl (models.specs.attention_mask_type).
    tokens, positions, mask = pad_columns(
        micro.teacher_tokens, micro.teacher_position_ids, micro.teacher_attention_mask,
        row_multiple(job, "teacher"),
    )  # fmt: skip
    projection = _projection(rows)
    output = chunk(tokens, positions, mask, **projection)
    if not get_attr_wrapped_model(chunk, "post_process"):
        return output, None
    # With the projection the logits start at column P-1: seen as a row with a 1-token prompt.
    view = dataclasses.replace(micro, prompt_length=1) if projection else micro
    # output: [b, R + 1, V/tp] (projected) or [b, P + R, V/tp]
    return None, teacher_targets(output, view, job.model, top_k, job.distill.topk_renormalize)


def student_forward(chunk: torch.nn.Module, micro: PackedBatch, job: JobConfig) -> torch.Tensor:
    """Hidden states [S(/tp), b, h] before the last stage; logits [b, R, V/tp] at the logit
    columns on it. S = the student row P + 2R padded to `row_multiple`."""
    tokens, positions, mask = pad_columns(
        micro.tokens, micro.position_ids, micro.attention_mask, row_multiple(job, "student")
    )
    return chunk(tokens, positions, mask, **_projection(micro.logit_columns.to(tokens.device)))


class StagePair(torch.nn.Module):
    """The schedule's model chunk for one pipeline stage: the student chunk, registered as
    `module` so that Megatron finds its config, parameters and DDP hooks through it, with the
    frozen teacher chunk of the same stage beside it (not registered: not part of the step's
    parameters). `set_input_tensor` splits a received boundary tensor between the two."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, teacher_rows: int):
        super().__init__()
        self.module = student
        object.__setattr__(self, "teacher", teacher)  # kept out of parameters() / modules()
        self.teacher_rows = teacher_rows  # this rank's rows of the teacher's part, T(/tp)
        self.post_process = get_attr_wrapped_model(student, "post_process")

    def set_input_tensor(self, input_tensor: list) -> None:
        (received,) = input_tensor  # [T(/tp) + S(/tp), b, h], None on the first stage
        teacher_part = student_part = None
        if received is not None:
            # The teacher runs without grad; the student's slice carries the gradient back.
            teacher_part = received[: self.teacher_rows].detach()  # [T(/tp), b, h]
            student_part = received[self.teacher_rows :]  # [S(/tp), b, h]
        get_attr_wrapped_model(self.teacher, "set_input_tensor")([teacher_part])
        get_attr_wrapped_model(self.module, "set_input_tensor")([student_part])

    def set_is_first_microbatch(self) -> None:
        """TE's FP8 weight caches (both models): the schedule calls it on its model chunk."""
        for chunk in (self.teacher, self.module):
            get_attr_wrapped_model(chunk, "set_is_first_microbatch")()


def loss_function(
    micro: PackedBatch,
    targets: TeacherTargets | None,
    job: JobConfig,
    num_global_loss_tokens: int,
    num_global_sequences: int,
):
    """The schedule's loss_func for one micro-batch: (loss, loss tokens, metrics), the loss
    already divided by the step's global loss-token count (module docstring)."""

    def loss_func(logits):  # [b, R, V/tp] at the logit columns (or [b, S, V/tp] unprojected)
        loss, metrics = distill_loss(
            logits, targets, micro, job.distill, num_global_loss_tokens,
            model_cfg=job.model, num_global_sequences=num_global_sequences,
        )  # fmt: skip
        num_tokens = torch.tensor(micro.num_loss_tokens, dtype=torch.int, device=loss.device)
        return loss, num_tokens, metrics

    return loss_func


@contextlib.contextmanager
def _finalize_on(config, student_chunks: list[torch.nn.Module]):
    """The schedule hands its model chunks to `finalize_model_grads_func` (DP grad sync, SP
    layer-norm and tied-embedding all-reduces): give it the students' DDP chunks themselves."""
    finalize = config.finalize_model_grads_func

    def on_students(_chunks, *args, **kwargs):
        return finalize(student_chunks, *args, **kwargs)

    if finalize is not None:
        config.finalize_model_grads_func = on_students
    try:
        yield
    finally:
        config.finalize_model_grads_func = finalize


def run_step(
    student_chunks: list[torch.nn.Module],
    teacher_chunks: list[torch.nn.Module] | None,
    micro_batches: list[PackedBatch],
    job: JobConfig,
    num_global_loss_tokens: int,
    num_global_sequences: int,
    forward_only: bool = False,
) -> StepOutput:
    """Teacher targets and student forward (and backward) over the micro-batches, in one schedule
    call; `teacher_chunks=None` runs the student alone (mode mdlm_sft: no targets)."""
    top_k = teacher_top_k(job)
    finite: list[bool] = []  # one flag per micro-batch's targets on this rank
    first = micro_batches[0]
    seq_length = padded_length(first.tokens.shape[1], row_multiple(job, "student"))
    chunks = student_chunks
    if teacher_chunks is not None:
        teacher_length = padded_length(first.teacher_tokens.shape[1], row_multiple(job, "teacher"))
        split = teacher_length // (job.parallel.tp if job.parallel.sequence_parallel else 1)
        chunks = [StagePair(t, s, split) for t, s in zip(teacher_chunks, student_chunks,
                                                          strict=True)]  # fmt: skip
        seq_length += teacher_length

    def forward_step(data_iterator, chunk):
        micro = next(data_iterator)
        teacher_hidden, targets = None, None
        if teacher_chunks is not None:
            teacher_hidden, targets = teacher_forward(chunk.teacher, micro, job, top_k)
            if targets is not None:
                finite.append(targets_are_finite(targets))
            chunk = chunk.module
        output = student_forward(chunk, micro, job)
        if teacher_hidden is not None:  # before the last stage: [T(/tp) + S(/tp), b, h]
            output = torch.cat([teacher_hidden, output], dim=0)

        return output, loss_function(
            micro, targets, job, num_global_loss_tokens, num_global_sequences
        )

    config = get_attr_wrapped_model(student_chunks[0], "config", allow_none=False)
    with _finalize_on(config, student_chunks):
        metrics = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators(micro_batches, len(chunks)),
            model=chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=first.batch_size,
            forward_only=forward_only,
        )
    return StepOutput(metrics=metrics, teacher_finite=all(finite))
