"""The step as it was before the fused schedule, kept as the reference the fused one must equal.

Two schedule calls per optimizer step: the teacher over ALL micro-batches (forward only), its
targets held as a list, then the student's forward-backward over the same micro-batches reading
them. Same signature and result as `training.steps.run_step`, so a test can swap it in
(`trainer.run_step`) and compare losses, gradient norms and updated weights bit for bit.
"""

from __future__ import annotations

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_opdlm.training import steps


@torch.no_grad()
def run_teacher(teacher_chunks, micro_batches, job, top_k):
    """Teacher targets of every micro-batch on the last pipeline stage (None elsewhere)."""

    def forward_step(data_iterator, chunk):
        hidden, targets = steps.teacher_forward(chunk, next(data_iterator), job, top_k)
        if targets is None:
            return hidden, None  # before the last stage: only sent on
        return hidden, lambda _: (torch.zeros(()), {"targets": targets})

    first = micro_batches[0]
    teacher_length = first.teacher_tokens.shape[1]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=steps.iterators(micro_batches, len(teacher_chunks)),
        model=teacher_chunks,
        num_microbatches=len(micro_batches),
        seq_length=steps.padded_length(teacher_length, steps.row_multiple(job, "teacher")),
        micro_batch_size=first.batch_size,
        forward_only=True,
    )
    return [out["targets"] for out in outputs] if outputs else None


def run_step(student_chunks, teacher_chunks, micro_batches, job, num_global_loss_tokens,
             num_global_sequences, forward_only=False) -> steps.StepOutput:  # fmt: skip
    targets = None
    if teacher_chunks is not None:
        targets = run_teacher(teacher_chunks, micro_batches, job, steps.teacher_top_k(job))
    finite = targets is None or all(steps.targets_are_finite(t) for t in targets)
    per_micro = targets if targets is not None else [None] * len(micro_batches)

    def forward_step(data_iterator, chunk):
        micro, micro_targets = next(data_iterator)
        output = steps.student_forward(chunk, micro, job)

        return output, steps.loss_function(
            micro, micro_targets, job, num_global_loss_tokens, num_global_sequences
        )

    first = micro_batches[0]
    metrics = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=steps.iterators(list(zip(micro_batches, per_micro)), len(student_chunks)),
        model=student_chunks,
        num_microbatches=len(micro_batches),
        seq_length=steps.padded_length(first.tokens.shape[1], steps.row_multiple(job, "student")),
        micro_batch_size=first.batch_size,
        forward_only=forward_only,
    )
    return steps.StepOutput(metrics=metrics, teacher_finite=finite)


class LiveTargets:
    """How many teacher log-prob tensors (the [b, R, V/tp] or top-K arrays of `teacher_targets`)
    are alive at once, and their bytes: counted through weak references each time one is made
    (the count only grows there, so its maximum is the maximum over the step)."""

    def __init__(self, steps_module=steps):
        self.module, self.original = steps_module, steps_module.teacher_targets
        self.refs: list = []
        self.max_alive, self.max_bytes = 0, 0
        self.sizes: list[int] = []  # bytes of each one made, in order

    def __enter__(self) -> LiveTargets:
        self.module.teacher_targets = self._recording
        return self

    def __exit__(self, *exc) -> None:
        self.module.teacher_targets = self.original

    def _recording(self, *args, **kwargs):
        import weakref

        targets = self.original(*args, **kwargs)
        values = targets.logprobs if targets.logprobs is not None else targets.topk_logprobs
        self.refs.append((weakref.ref(values), values.nbytes))
        self.refs = [(ref, size) for ref, size in self.refs if ref() is not None]
        self.sizes.append(values.nbytes)
        self.max_alive = max(self.max_alive, len(self.refs))
        self.max_bytes = max(self.max_bytes, sum(size for _, size in self.refs))
        return targets
