"""Every attention pattern of block diffusion as one mask predicate over column descriptors.

This is the single source of truth for who attends to whom. Dense boolean masks (`models.masks`,
the local and Transformer Engine cores) and FlexAttention block masks (`models.flex_attention`)
are both evaluated from `allowed` below; nothing else writes the rule.

Column descriptor. Each key column c of a forward carries three values:
- block id: floor((absolute position - P) / B) with blocks aligned to the response start P (prompt
  blocks are negative), so a left-padded batch shares one block boundary column;
- noisy flag: the column holds x_t (the block being denoised), not a clean token;
- valid flag: False on padding.
Queries are the last `num_queries` key columns: query i is key column i + (num_keys - num_queries).
That covers full forwards (queries == keys) and cached rounds (keys = committed prefix + the block).

The rule (`allowed`, True = may attend):
- clean query of block q: clean keys of blocks <= q;
- noisy query of block q: clean keys of blocks < q, noisy keys of block q;
- never an invalid key; an invalid query sees only itself (its softmax stays finite, its output is
  never read).

The patterns are column layouts (one constructor each):
- teacher: causal + key padding = block size 1 aligned at 0, all clean (`teacher_columns`);
- student: block-causal aligned to the response start, padding (`student_columns`);
- packed training row [prompt (P) | x0 (R) | x_t (R)] (`packed_row_columns`): x_t block b sees the
  prompt, x0 blocks < b and itself;
- cached rollout rounds (`rollout_round_columns`): the block queries (and a finished block in a
  fused commit) against prompt + committed blocks + themselves, per-row validity from left padding.

A descriptor is one int32 tensor [b, 3, K] (rows: block id, noisy, valid): O(S) memory, so it
can travel through megatron's `attention_mask` argument (recompute saves tensors only) to a
FlexAttention core, which builds its block mask from it without ever forming an [S, S] tensor.
"""

from __future__ import annotations

import torch

BLOCK_ROW, NOISY_ROW, VALID_ROW = 0, 1, 2


def allowed(
    q_block: torch.Tensor,
    q_noisy: torch.Tensor,
    q_valid: torch.Tensor,
    k_block: torch.Tensor,
    k_noisy: torch.Tensor,
    k_valid: torch.Tensor,
    same_column: torch.Tensor,
) -> torch.Tensor:
    """THE block-diffusion predicate (True = the query may attend to the key), elementwise.

    Broadcastable tensors: vectorised over [b, s_q, s_k] for dense masks, or the scalar-like index
    tensors of a FlexAttention mask_mod. Flags are bool. `same_column`: the query is this key.
    """
    clean_key = ~k_noisy & ((~q_noisy & (k_block <= q_block)) | (q_noisy & (k_block < q_block)))
    noisy_key = k_noisy & q_noisy & (k_block == q_block)
    return ((clean_key | noisy_key) & k_valid) | (same_column & ~q_valid)


def aligned_block_ids(
    positions: torch.Tensor, response_start: int, block_size: int
) -> torch.Tensor:
    """Block id of each absolute column, blocks aligned so that one starts at `response_start`."""
    return torch.div(positions - response_start, block_size, rounding_mode="floor")


def descriptor(
    block: torch.Tensor,  # [b or 1, K] int
    noisy: torch.Tensor,  # [b or 1, K] bool
    valid: torch.Tensor | None,  # [b, K] bool, None = all valid
    batch: int | None = None,
) -> torch.Tensor:
    """Pack per-column block ids and flags into the [b, 3, K] int32 descriptor."""
    b = valid.shape[0] if valid is not None else (batch or block.shape[0])
    k = block.shape[-1]
    if valid is None:
        valid = torch.ones(b, k, dtype=torch.bool, device=block.device)
    rows = [block.expand(b, k), noisy.expand(b, k), valid.expand(b, k)]
    return torch.stack([r.to(torch.int32) for r in rows], dim=1)  # [b, 3, K]


def teacher_columns(valid: torch.Tensor) -> torch.Tensor:  # valid [b, L] bool
    """Causal with key padding: block size 1 aligned at 0 is exactly causal. [b, 3, L]."""
    return student_columns(valid.shape[1], 0, 1, valid=valid)


def student_columns(
    length: int,
    response_start: int,
    block_size: int,
    valid: torch.Tensor | None = None,  # [b, length] bool
    batch: int = 1,
) -> torch.Tensor:
    """Block-causal clean sequence [prompt | committed blocks], blocks aligned to the response
    start. [b, 3, length]."""
    device = valid.device if valid is not None else None
    positions = torch.arange(length, device=device)
    block = aligned_block_ids(positions, response_start, block_size)[None]  # [1, L]
    noisy = torch.zeros_like(block, dtype=torch.bool)
    return descriptor(block, noisy, valid, batch=batch)


def packed_row_layout(
    prompt_length: int, response_length: int, block_size: int, device=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Columns of one training row [prompt (P) | x0 (R) | x_t (R)].

    Returns (block_ids [S], noisy [S], position_ids [S]) with S = P + 2R. x_t block b has the
    position ids of the x0 block it copies (P + r), so RoPE sees the same geometry as at rollout.
    """
    if response_length % block_size:
        raise ValueError(
            f"response length {response_length} is not a multiple of block size {block_size}"
        )
    p, r = prompt_length, response_length
    clean_positions = torch.arange(p + r, device=device)  # prompt and x0
    noisy_positions = torch.arange(p, p + r, device=device)  # x_t copies x0 positions
    position_ids = torch.cat([clean_positions, noisy_positions])  # [P + 2R]
    block_ids = aligned_block_ids(position_ids, p, block_size)
    noisy = torch.cat(
        [
            torch.zeros(p + r, dtype=torch.bool, device=device),
            torch.ones(r, dtype=torch.bool, device=device),
        ]  # fmt: skip
    )
    return block_ids, noisy, position_ids


def packed_row_columns(
    prompt_length: int,
    response_length: int,
    block_size: int,
    valid: torch.Tensor,  # [b, P + 2R] bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Descriptor [b, 3, S] and position ids [b, S] of packed training rows."""
    block_ids, noisy, position_ids = packed_row_layout(
        prompt_length, response_length, block_size, device=valid.device
    )
    columns = descriptor(block_ids[None], noisy[None], valid)
    return columns, position_ids.expand(valid.shape[0], -1).contiguous()


def rollout_round_columns(
    offset: int,
    num_queries: int,
    prompt_length: int,
    block_size: int,
    key_valid: torch.Tensor,  # [b, >= offset + num_queries] bool, per-row validity
) -> torch.Tensor:
    """A cached round: queries at columns [offset, offset + n) against keys [0, offset + n)
    (committed prefix, earlier query blocks and their own block, block-causal on clean tokens).
    [b, 3, offset + n]; the queries are its last n columns."""
    keys = offset + num_queries
    return student_columns(keys, prompt_length, block_size, valid=key_valid[:, :keys])


def unpack(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(block [b, K] int32, noisy [b, K] bool, valid [b, K] bool) of a descriptor."""
    return columns[:, BLOCK_ROW], columns[:, NOISY_ROW].bool(), columns[:, VALID_ROW].bool()


def dense_allowed(columns: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
    """[b, s_q, K] bool, True = may attend: the predicate evaluated on the whole grid (CPU and
    dense-core paths only; O(s_q * K))."""
    block, noisy, valid = unpack(columns)  # [b, K] each
    k = block.shape[1]
    n = k if num_queries is None else num_queries
    offset = k - n
    q_block, q_noisy, q_valid = block[:, offset:], noisy[:, offset:], valid[:, offset:]
    q_col = torch.arange(offset, k, device=columns.device)[:, None]  # [s_q, 1]
    k_col = torch.arange(k, device=columns.device)[None, :]  # [1, K]
    return allowed(
        q_block[:, :, None], q_noisy[:, :, None], q_valid[:, :, None],
        block[:, None, :], noisy[:, None, :], valid[:, None, :],
        (q_col == k_col)[None],
    )  # fmt: skip


def dense_mask(columns: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
    """Megatron's convention: [b, 1, s_q, K] bool, True = masked out."""
    return ~dense_allowed(columns, num_queries)[:, None]


def is_descriptor(attention_mask) -> bool:
    """Whether an `attention_mask` argument is a column descriptor (else a dense mask or None)."""
    return (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 3
        and attention_mask.shape[1] == 3
        and attention_mask.dtype == torch.int32
    )
