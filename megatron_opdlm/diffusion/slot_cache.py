"""A KV cache with one committed length per slot, on megatron's static cache layout.

The rollout engine (`diffusion.engine`) decodes rows that are at different blocks in one forward,
so each row writes its K/V at its own columns and reads its own prefix; megatron's
StaticInferenceContext has one offset for the whole batch (measured in
shared/notes/rollout-engine-probe.md: a shared offset with the short row's gap masked is wrong
by 0.1 because RoPE then places the block too far away). Two small pieces, no fork of GPTModel:

- `SlotCache` (a StaticInferenceContext): K/V per layer [max_len, slots, kv_groups/tp, head_dim]
  as megatron allocates them, but zero-initialised (a short row reads columns nobody wrote, up to
  the longest row's end: masked, but 0 x NaN left in `torch.empty` memory would be NaN), and a
  per-forward plan: batch row i writes its n new K/V at columns [start_i, start_i + n) of slot
  `slots[i]` (a slot may appear twice: a finished block and the next block of one sequence).
  Column = position: every slot is left-aligned (prompt at column 0).
- `slot_attention(chunks)`: a context manager that gives each SelfAttention an
  `_adjust_key_value_for_inference` honouring the plan while a SlotCache is passed (megatron's
  own behaviour for any other context): per-row query RoPE from the same frequency table, keys
  rotated before caching (so a read never re-rotates the prefix; measured 0.9x of a round), and
  the layer's own attention mask type kept, so the explicit mask is applied on every path
  (megatron forces no_mask once its offset is > 0). The rows' RoPE cos/sin are computed once per
  forward (not per layer) and megatron's local core attention runs as one fused SDPA op while
  the context is held (`_core_attention_for_slots`; megatron's own core where it would differ).

The caller's mask must hide every key column at or past a row's own end. TP: each rank writes its
own kv groups (nothing TP-specific). Transformer Engine's fused RoPE is not used here (it takes
one [s, 1, 1, d] table for the batch); the rotation is megatron's unfused one.
"""

from __future__ import annotations

import contextlib
import types

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.common.embeddings.rope_utils import _rotate_half
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SlotCache(StaticInferenceContext):
    """K/V of `slots` sequences, each left-aligned; the plan of the next forward (`plan`)."""

    def __init__(self, slots: int, max_length: int, device):
        super().__init__(max_batch_size=slots, max_sequence_length=max_length)
        # only honoured in megatron's InferenceMode (never entered): keep every query row
        self.config.materialize_only_last_token_logits = False
        self.device = torch.device(device)
        self.slots = self.starts = None
        self._index = None  # per-forward write indices, computed once for all layers

    def plan(self, slots: torch.Tensor, starts: torch.Tensor) -> None:
        """Batch row i of the next forward: cache slot slots[i], first query column starts[i]."""
        self.slots = slots.to(self.device, torch.long)  # [b]
        self.starts = starts.to(self.device, torch.long)  # [b]
        self._index = None

    def index(self, n: int, table: torch.Tensor | None):
        """(write index (columns [n, b], slots [n, b]), slot range or None, end, (cos, sin) of
        the rows' RoPE angles [n, b, 1, d] or None): computed once per forward, for all layers."""
        if self._index is None or self._index[0] != n:
            b = self.slots.numel()
            columns = self.starts[None, :] + torch.arange(n, device=self.device)[:, None]  # [n, b]
            end = int((self.starts + n).max())
            if end > self.max_sequence_length:
                raise RuntimeError(
                    f"a row reaches column {end} past the cache's {self.max_sequence_length}"
                )
            first = int(self.slots[0])
            span = torch.arange(first, first + b, device=self.device)
            contiguous = (first, first + b) if torch.equal(self.slots, span) else None
            rotation = None
            if table is not None:  # megatron's cos/sin of each row's angles, once, not per layer
                freqs = table[:, 0][columns]  # [n, b, 1, d] per row
                rotation = (torch.cos(freqs), torch.sin(freqs))
            write = (columns, self.slots[None, :].expand(n, b))
            self._index = (n, write, contiguous, end, rotation)
        return self._index[1:]

    def memory_bytes(self) -> int:
        """Bytes held by the K/V tensors of this rank's layers."""
        return sum(t.numel() * t.element_size() for kv in self.key_value_memory_dict.values()
                   for t in kv)  # fmt: skip

    def free(self) -> None:
        self.key_value_memory_dict.clear()
        self.reset()


def _rotate(t: torch.Tensor, rotation, interleaved: bool) -> torch.Tensor:
    """megatron's `_apply_rotary_pos_emb_bshd(t, freqs)` (mscale 1) from precomputed (cos, sin)
    [n, b, 1, d]: the same operations on the same values, so the same bits. t [n, b, heads, dh]."""
    cos, sin = rotation
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    rot_dim = cos.shape[-1]
    if rot_dim == t.shape[-1]:
        return t * cos + _rotate_half(t, interleaved) * sin
    t, t_pass = t[..., :rot_dim], t[..., rot_dim:]  # partial rotary: the rest passes through
    return torch.cat((t * cos + _rotate_half(t, interleaved) * sin, t_pass), dim=-1)


def slot_key_values(attention, cache: SlotCache, query, key, value, rotary_pos_emb):
    """The SlotCache step of one SelfAttention: rotate query and key at each row's positions,
    write the rows' K/V at their planned columns, read each row's prefix. query/key/value
    [n, b, heads|groups, head_dim] -> (query, keys [end, b, groups, d], values)."""
    n = key.shape[0]
    if attention.layer_number not in cache.key_value_memory_dict:
        memory = tuple(
            attention._allocate_memory(cache.max_sequence_length, cache.max_batch_size, dim,
                                       t.dtype).to(cache.device).zero_()
            for dim, t in ((attention.key_hidden_size, key), (attention.val_hidden_size, value))
        )  # fmt: skip
        cache.key_value_memory_dict[attention.layer_number] = memory
    key_memory, value_memory = cache.key_value_memory_dict[attention.layer_number]
    table = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
    write, contiguous, end, rotation = cache.index(n, table)
    if rotation is not None:  # rows at their own positions: rotate here, keys before caching
        interleaved = attention.config.rotary_interleaved
        query = _rotate(query, rotation, interleaved)
        key = _rotate(key, rotation, interleaved)
    key_memory.index_put_(write, key)
    value_memory.index_put_(write, value)
    if contiguous is not None:  # a view, as megatron's own read
        lo, hi = contiguous
        return query, key_memory[:end, lo:hi], value_memory[:end, lo:hi]
    # [end, b, groups, d] gathered (a slot twice, or slots out of order)
    return query, key_memory[:end, cache.slots], value_memory[:end, cache.slots]


def _adjust_for_slots(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
    """SelfAttention._adjust_key_value_for_inference for a SlotCache (see the module docstring);
    query/key/value [n, b, heads, head_dim]."""
    if not isinstance(inference_context, SlotCache):
        return type(self)._adjust_key_value_for_inference(
            self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs
        )
    query, keys, values = slot_key_values(
        self, inference_context, query, key, value, rotary_pos_emb
    )
    # rotary None: nothing left to rotate; the layer's own mask type: the explicit mask is used
    return query, keys, values, None, self.attn_mask_type, None


def sdpa_applies(core, query, attention_mask, attention_bias, packed_seq_params) -> bool:
    """True when torch's fused attention computes what megatron's local core would: fp32, no
    dropout, plain softmax and scale, a bool mask, no bias / packing / window."""
    config = core.config
    return (
        query.dtype == torch.float32
        and isinstance(attention_mask, torch.Tensor)
        and attention_mask.dtype == torch.bool
        and attention_bias is None
        and packed_seq_params is None
        and not (core.training and core.attention_dropout.p > 0)
        and config.softmax_type == "vanilla"
        and not config.apply_query_key_layer_scaling
        and config.window_size is None
    )


def slot_core_attention(core, query, key, value, attention_mask, attn_mask_type=None):
    """A core attention of a SlotCache forward: query [sq, b, heads, d], key/value [sk, b,
    groups, d], mask [b|1, 1, sq, sk] True = masked out -> [sq, b, heads * d].
    - megatron's local core: one fused op (torch SDPA) where `sdpa_applies` (its baddbmm +
      masked softmax (-10000 fill) + bmm in ~12 ops, a GQA repeat of the whole prefix per
      layer): the same result up to fp32 rounding, as every query row of the engine's masks sees
      at least one key (itself);
    - the FlexAttention core: SDPA on the engine's dense mask in any dtype (a round is a few
      queries per row against its prefix: a dense [b, 1, B, end] mask is small, and flex would
      build a block mask from it per forward);
    - anything else: the core's own forward."""
    takes_columns = getattr(core, "takes_mask_columns", False)
    if (
        takes_columns
        and not core.training
        and isinstance(attention_mask, torch.Tensor)
        and (attention_mask.dtype == torch.bool)
    ):
        return sdpa_core_attention(core, query, key, value, attention_mask)
    if not takes_columns and sdpa_applies(core, query, attention_mask, None, None):
        return sdpa_core_attention(core, query, key, value, attention_mask)
    return type(core).forward(core, query, key, value, attention_mask,
                              attn_mask_type=attn_mask_type)  # fmt: skip


def _core_attention_for_slots(
    self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
    packed_seq_params=None,
):  # fmt: skip
    """The core's forward while `slot_attention` is held (`slot_core_attention`)."""
    if attention_bias is not None or packed_seq_params is not None:
        return type(self).forward(
            self, query, key, value, attention_mask, attn_mask_type=attn_mask_type,
            attention_bias=attention_bias, packed_seq_params=packed_seq_params,
        )  # fmt: skip
    return slot_core_attention(self, query, key, value, attention_mask, attn_mask_type)


def sdpa_core_attention(core, query, key, value, attention_mask):
    """megatron's local core attention as torch SDPA (where `sdpa_applies`): query [sq, b,
    heads, d], key/value [sk, b, groups, d], mask [b|1, 1, sq, sk] True = masked out ->
    [sq, b, heads * d]."""
    sq, b = query.shape[:2]
    context = torch.nn.functional.scaled_dot_product_attention(
        query.permute(1, 2, 0, 3),  # [b, heads, sq, d]
        key.permute(1, 2, 0, 3),  # [b, groups, sk, d]
        value.permute(1, 2, 0, 3),
        attn_mask=~attention_mask,  # True = takes part
        scale=core.softmax_scale,
        enable_gqa=query.shape[2] != key.shape[2],
    )  # [b, heads, sq, d]
    return context.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, heads * d]


def slot_core_supported(core) -> bool:
    """Megatron's local core or the FlexAttention core (see `slot_core_attention`)."""
    return type(core) is DotProductAttention or getattr(core, "takes_mask_columns", False)


@contextlib.contextmanager
def slot_attention(model_chunks: list[torch.nn.Module]):
    """Let every SelfAttention of the chunks serve a SlotCache for the duration (restored after),
    and their core attentions run as `slot_core_attention`."""
    modules = [m for c in model_chunks for m in c.modules() if isinstance(m, SelfAttention)]
    cores = [m.core_attention for m in modules if slot_core_supported(m.core_attention)]
    cores = [core for core in cores if "forward" not in vars(core)]
    for module in modules:
        module._adjust_key_value_for_inference = types.MethodType(_adjust_for_slots, module)
    for core in cores:
        core.forward = types.MethodType(_core_attention_for_slots, core)
    try:
        yield
    finally:
        for module in modules:
            del module._adjust_key_value_for_inference
        for core in cores:
            del core.forward
