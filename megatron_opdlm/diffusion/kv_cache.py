"""KV cache of the committed context (prompt and finished blocks) on megatron's
StaticInferenceContext (measured in shared/notes/block-diffusion-kv-cache.md).

Each attention layer keeps K/V [max_seq, b, kv_groups/tp, head_dim] (its own layers on each
pipeline stage, its own kv groups on each TP rank). A forward with the context writes slots
[offset, offset + s) and attends to [:offset + s]; the offset only moves when we `commit`, so
the rounds of a block overwrite the same slots and the committed prefix stays bit-identical.
RoPE positions come from the offset (the column index), the same as a full forward over
[prompt | blocks] with position ids 0..L-1.

The last round's K/V were computed while the block still held masks, so a finished block is
committed by the next forward ("fused commit"): the next block's first round takes queries
[finished block | new block] with a block-causal mask and the offset then advances by B only.

Explicit masks: with offset > 0 megatron's attention forces attn_mask_type=no_mask unless the
module is in training mode on Transformer Engine >= 2.2. The local attention honours the mask we
pass either way; TE would ignore it (and so attend to left padding and, in a fused commit, from
the finished block to the new one). `ExplicitMasks` marks the Attention modules whose core
attention is not the local one as training for the call (dropout is 0 in our configs, and the
flag changes nothing else there).
Untested on Transformer Engine (no GPU was available when this was written).
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.dot_product_attention import DotProductAttention


class BlockKVCache:
    """The committed context of one rollout batch. Free it with `free()` (or use `with`)."""

    def __init__(self, batch_size: int, max_length: int):
        self.context = StaticInferenceContext(
            max_batch_size=batch_size, max_sequence_length=max_length
        )
        # only honoured in megatron's InferenceMode (which we never enter): keep every query row
        self.context.config.materialize_only_last_token_logits = False

    @property
    def offset(self) -> int:
        """Columns committed so far: the next forward's queries start here."""
        return self.context.sequence_len_offset

    def commit(self, columns: int) -> None:
        """Keep the first `columns` query slots of the last forward as committed context."""
        self.context.increment_sequence_len_offset(columns)

    def free(self) -> None:
        """Drop the K/V tensors so training can reuse the memory."""
        self.context.key_value_memory_dict.clear()
        self.context.reset()

    def __enter__(self) -> BlockKVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.free()


class ExplicitMasks:
    """Context manager making cached forwards use the mask we pass (see the module docstring).

    Built once per rollout (it walks the modules); entered around every cached forward.
    """

    def __init__(self, model_chunks: list[torch.nn.Module]):
        # megatron's local DotProductAttention and the flex core always apply the mask they are
        # given: leave those alone (the flag would also make every call re-probe the Transformer
        # Engine version)
        self.attentions = [
            m
            for chunk in model_chunks
            for m in chunk.modules()
            if isinstance(m, Attention)
            and not isinstance(m.core_attention, DotProductAttention)
            and not getattr(m.core_attention, "takes_mask_columns", False)
        ]
        self.modes: list[bool] = []

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.attentions]
        for module in self.attentions:
            module.training = True

    def __exit__(self, *exc) -> None:
        for module, training in zip(self.attentions, self.modes, strict=True):
            module.training = training
