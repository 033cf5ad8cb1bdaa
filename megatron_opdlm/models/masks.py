"""Attention masks and position ids for block diffusion, vectorised.

Convention (Megatron's): a boolean mask [b, 1, s_q, s_k] where True means *masked out*.

Every mask here is evaluated from the one predicate of `models.mask_functions` (block ids aligned
to the response start P, noisy and valid flags per column; read the rule there). This module only
lays out columns and chooses the form a model takes:
- "dense": the [b, 1, s_q, s_k] bool mask (Megatron's local core, Transformer Engine, CPU training);
- "columns": the [b, 3, s_k] int32 column descriptor, O(S), which the FlexAttention core turns
  into a block mask without any [S, S] tensor (`models.flex_attention`).
`mask_format(model_chunks)` says which form a built model takes.
"""

from __future__ import annotations

import torch

from megatron_opdlm.models import mask_functions as mf
from megatron_opdlm.models.mask_functions import aligned_block_ids, packed_row_layout

__all__ = [
    "aligned_block_ids",
    "attention_input",
    "block_causal_mask",
    "block_diffusion_mask",
    "causal_mask",
    "mask_format",
    "packed_row_layout",
    "packed_row_mask",
    "xt_logit_columns",
]

MASK_FORMATS = ("dense", "columns")


def mask_format(model_chunks) -> str:
    """'columns' when the model's core attention takes column descriptors (FlexAttention), else
    'dense'. Read from the built modules, so producers never need the config."""
    for chunk in model_chunks:
        for module in chunk.modules():
            if getattr(module, "takes_mask_columns", False):
                return "columns"
    return "dense"


def attention_input(
    columns: torch.Tensor, fmt: str, num_queries: int | None = None
) -> torch.Tensor:
    """What goes in the model's `attention_mask` argument: the descriptor itself ("columns"), or
    its dense mask [b, 1, s_q, K] ("dense"); queries are the last `num_queries` columns."""
    if fmt == "columns":
        return columns
    if fmt == "dense":
        return mf.dense_mask(columns, num_queries)
    raise ValueError(f"mask format {fmt!r} must be one of {MASK_FORMATS}")


def block_diffusion_mask(
    query_block: torch.Tensor,  # [b, s_q] int
    query_noisy: torch.Tensor,  # [b, s_q] bool
    key_block: torch.Tensor,  # [b, s_k] int
    key_noisy: torch.Tensor,  # [b, s_k] bool
    key_valid: torch.Tensor | None = None,  # [b, s_k] bool
    query_is_key_offset: int | None = 0,
) -> torch.Tensor:
    """The predicate on explicit query/key columns. Returns [b, 1, s_q, s_k], True = masked out.

    `query_is_key_offset`: query i is key i + offset (for the "invalid query sees itself" rule);
    None when queries are not among the keys.
    """
    b, s_q = query_block.shape
    s_k = key_block.shape[1]
    device = key_block.device
    if key_valid is None:
        key_valid = torch.ones(b, s_k, dtype=torch.bool, device=device)
    rows = torch.arange(s_q, device=device)
    same_column = torch.zeros(s_q, s_k, dtype=torch.bool, device=device)  # [s_q, s_k]
    query_valid = torch.ones(b, s_q, dtype=torch.bool, device=device)
    if query_is_key_offset is not None:
        cols = rows + query_is_key_offset
        inside = cols < s_k
        same_column[rows[inside], cols[inside]] = True
        query_valid[:, rows[inside]] = key_valid[:, cols[inside]]
    allowed = mf.allowed(
        query_block[:, :, None], query_noisy[:, :, None], query_valid[:, :, None],
        key_block[:, None, :], key_noisy[:, None, :], key_valid[:, None, :],
        same_column[None],
    )  # fmt: skip
    return ~allowed[:, None]


def block_causal_mask(
    length: int,
    response_start: int,
    block_size: int,
    valid: torch.Tensor | None = None,  # [b, length] bool
    batch: int = 1,
) -> torch.Tensor:
    """Block-causal mask over a clean sequence [prompt | committed blocks]: [b, 1, L, L]."""
    columns = mf.student_columns(length, response_start, block_size, valid=valid, batch=batch)
    return mf.dense_mask(columns)


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """Plain causal mask with padding: [b, 1, L, L] (block size 1 is exactly causal)."""
    return mf.dense_mask(mf.teacher_columns(valid))


def packed_row_mask(
    prompt_length: int,
    response_length: int,
    block_size: int,
    valid: torch.Tensor,  # [b, P + 2R] bool
    fmt: str = "dense",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [b, 1, S, S] (or descriptor [b, 3, S]) and position ids [b, S] for packed rows."""
    columns, position_ids = mf.packed_row_columns(prompt_length, response_length, block_size, valid)
    return attention_input(columns, fmt), position_ids


def xt_logit_columns(
    prompt_length: int, response_length: int, block_size: int, token_shift: bool
) -> torch.Tensor:
    """Column of the packed row whose logits predict response token r, for r in [0, R).

    No shift: the x_t column of r itself. Token shift (AR head convention): the column before
    r; for the first token of a block that is the last clean token before it (x0 of the
    previous block or the last prompt token), whose context is exactly the committed prefix.
    """
    p, r = prompt_length, response_length
    response = torch.arange(r)
    xt_columns = p + r + response  # [R]
    if not token_shift:
        return xt_columns
    block_start = (response % block_size) == 0
    return torch.where(block_start, p + response - 1, xt_columns - 1)
