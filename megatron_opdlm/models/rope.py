"""RoPE at explicit positions for packed block-diffusion rows.

Megatron's GPTModel ignores `position_ids` for RoPE: it rotates column j by angle j. A packed
training row [prompt | x0 | x_t] needs x_t block b at the positions of the x0 block it copies, or
the student would train on a geometry it never sees at rollout. `PositionedRotaryEmbedding` keeps
Megatron's behaviour and numerics (the same float32 outer product) and, when the forward's
`position_ids` are not the plain column index, builds the angles from them instead. Rows of a
batch share one layout (prompts are left-padded to one width), so positions are taken from row 0
and must be equal across rows. Inference with a KV cache keeps Megatron's path: there, column index
and position coincide.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


class PositionedRotaryEmbedding(RotaryEmbedding):
    """RotaryEmbedding whose angles follow `position_override` when it is set."""

    position_override: torch.Tensor | None = None  # [s] long

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        positions = self.position_override
        if positions is None:
            return super().forward(max_seq_len, offset, packed_seq, cp_group)
        if positions.numel() != max_seq_len:
            raise ValueError(
                f"{positions.numel()} position ids for a sequence of {max_seq_len} columns"
            )
        seq = positions.to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            seq = seq * (1 / self.seq_len_interpolation_factor)
        freqs = torch.outer(seq, self.inv_freq)  # [s, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [s, d] (megatron's non-interleaved layout)
        return emb[:, None, None, :]  # [s, 1, 1, d]


def _set_positions_hook(module, args, kwargs):
    """forward pre-hook of GPTModel: route explicit position ids into RoPE."""
    rotary = module.rotary_pos_emb
    rotary.position_override = None
    if kwargs.get("inference_context") is not None or kwargs.get("inference_params") is not None:
        return None
    position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
    if position_ids is None:
        return None
    row = position_ids[0]  # [s]
    if position_ids.shape[0] > 1 and not torch.equal(position_ids, row.expand_as(position_ids)):
        raise ValueError(
            "rows of a batch carry different position ids; the RoPE path needs one layout per "
            "batch (left-pad prompts to one width)"
        )
    if torch.equal(row, torch.arange(row.numel(), device=row.device)):
        return None  # the plain column index: megatron's own (cached) path
    rotary.position_override = row
    return None


def install_positioned_rope(model, inv_freq: torch.Tensor) -> None:
    """Replace a GPTModel's RotaryEmbedding by the positioned one (same inverse frequencies)."""
    old = model.rotary_pos_emb
    new = PositionedRotaryEmbedding(
        kv_channels=inv_freq.numel() * 2,
        rotary_percent=1.0,
        seq_len_interpolation_factor=old.seq_len_interpolation_factor,
        use_cpu_initialization=True,
        cp_group=old.cp_group,
    )
    new.inv_freq = inv_freq.to(old.inv_freq.device)
    model.rotary_pos_emb = new
    model.register_forward_pre_hook(_set_positions_hook, with_kwargs=True)
