"""The vocabulary projection of selected rows only: a GPTModel `output_processor`.

The loss reads R of the S = P + 2R student columns and R of the P + R teacher columns, and the
sampler reads a block's rows: projecting only those skips most of the output layer's FLOPs and
its [b, S, V] activations. Used by the training steps (vocab-parallel logits) and the sampler
(logits gathered over TP).

Under sequence parallelism the decoder's output is this rank's slice of the sequence
[s/tp, b, h]; the rows are then gathered first (backward: each rank keeps its slice of the full,
already TP-reduced gradient) and the output layer runs as without sequence parallelism for the
call (input copied, input gradient all-reduced over TP): the same math on n rows instead of s.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch


@contextlib.contextmanager
def _without_sequence_parallel(output_layer):
    """The output layer's forward as without SP; its backward keeps what the forward chose."""
    saved = (output_layer.sequence_parallel, output_layer.allreduce_dgrad)
    output_layer.sequence_parallel = False
    output_layer.allreduce_dgrad = not getattr(output_layer, "disable_grad_reduce", False)
    try:
        yield
    finally:
        output_layer.sequence_parallel, output_layer.allreduce_dgrad = saved


def project_rows(
    *, hidden_states, output_layer, output_weight, context, scale_logits, gather_output, **_
) -> torch.Tensor:
    """hidden_states [s, b, h] (or [s/tp, b, h] under SP); context: LongTensor of row indices.

    Returns logits [b, n, V] (gather_output) or [b, n, V/tp] (vocab-parallel).
    """
    rows = context  # [n] long
    if rows.numel() == 0:  # nothing to read (a prefill without token shift): skip the projection
        return hidden_states.new_zeros((hidden_states.shape[1], 0, 1))
    if getattr(output_layer, "sequence_parallel", False):
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        full = gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=False, group=output_layer.tp_group
        )  # [s, b, h]
        with _without_sequence_parallel(output_layer):
            logits, _ = output_layer(
                full.index_select(0, rows),
                weight=output_weight,
                runtime_gather_output=gather_output,
            )  # [n, b, V or V/tp]
    else:
        logits, _ = output_layer(
            hidden_states.index_select(0, rows),
            weight=output_weight,
            runtime_gather_output=gather_output,
        )  # [n, b, V or V/tp]
    return scale_logits(logits).transpose(0, 1).contiguous()  # [b, n, V or V/tp]


project_rows_vocab_parallel = partial(project_rows, gather_output=False)
project_rows_gathered = partial(project_rows, gather_output=True)
