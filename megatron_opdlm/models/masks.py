"""Attention masks and position ids for block diffusion, vectorised.

Convention (Megatron's): a boolean mask [b, 1, s_q, s_k] where True means *masked out*.

Every position carries a block id, a "noisy" flag and a "valid" flag:
- Block ids are aligned to the response start P: position j has block floor((j - P) / B), so the
  last prompt block ends exactly where the response starts (prompt blocks are negative ids) and a
  left-padded batch shares one boundary column.
- Clean positions (prompt, x0, committed blocks) attend block-causally: a clean query of block q
  sees clean keys of blocks <= q.
- Noisy positions (x_t, the block being denoised) of block q see clean keys of blocks < q and noisy
  keys of the same block q; clean queries never see noisy keys.
- Invalid keys (padding) are never seen; an invalid query sees only itself, so its softmax stays
  finite (its output is never read).
"""

from __future__ import annotations

import torch


def aligned_block_ids(
    positions: torch.Tensor, response_start: int, block_size: int
) -> torch.Tensor:
    """Block id of each absolute column, blocks aligned so that one starts at `response_start`."""
    return torch.div(positions - response_start, block_size, rounding_mode="floor")


def block_diffusion_mask(
    query_block: torch.Tensor,  # [b, s_q] int
    query_noisy: torch.Tensor,  # [b, s_q] bool
    key_block: torch.Tensor,  # [b, s_k] int
    key_noisy: torch.Tensor,  # [b, s_k] bool
    key_valid: torch.Tensor | None = None,  # [b, s_k] bool
    query_is_key_offset: int | None = 0,
) -> torch.Tensor:
    """The general rule above. Returns [b, 1, s_q, s_k], True = masked out.

    `query_is_key_offset`: query i is key i + offset (for the "invalid query sees itself" rule);
    None when queries are not among the keys.
    """
    qb, kb = query_block[:, :, None], key_block[:, None, :]  # [b, s_q, 1], [b, 1, s_k]
    qn, kn = query_noisy[:, :, None], key_noisy[:, None, :]
    clean_key = ~kn & ((~qn & (kb <= qb)) | (qn & (kb < qb)))
    noisy_key = kn & qn & (kb == qb)
    allowed = clean_key | noisy_key  # [b, s_q, s_k]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
        if query_is_key_offset is not None:
            s_q, s_k = query_block.shape[1], key_block.shape[1]
            rows = torch.arange(s_q, device=allowed.device)
            cols = rows + query_is_key_offset
            inside = cols < s_k
            rows, cols = rows[inside], cols[inside]
            invalid_query = ~key_valid[:, cols]  # [b, n]
            allowed[:, rows, cols] |= invalid_query
    return ~allowed[:, None, :, :]


def block_causal_mask(
    length: int,
    response_start: int,
    block_size: int,
    valid: torch.Tensor | None = None,  # [b, length] bool
    batch: int = 1,
) -> torch.Tensor:
    """Block-causal mask over a clean sequence [prompt | committed blocks]: [b, 1, L, L]."""
    device = valid.device if valid is not None else None
    positions = torch.arange(length, device=device)
    blocks = aligned_block_ids(positions, response_start, block_size)
    b = valid.shape[0] if valid is not None else batch
    blocks = blocks.expand(b, length)
    clean = torch.zeros(b, length, dtype=torch.bool, device=device)
    return block_diffusion_mask(blocks, clean, blocks, clean, valid)


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """Plain causal mask with padding: [b, 1, L, L] (block size 1 is exactly causal)."""
    b, length = valid.shape
    return block_causal_mask(length, 0, 1, valid=valid, batch=b)


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


def packed_row_mask(
    prompt_length: int,
    response_length: int,
    block_size: int,
    valid: torch.Tensor,  # [b, P + 2R] bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [b, 1, S, S] and position ids [b, S] for packed training rows."""
    block_ids, noisy, position_ids = packed_row_layout(
        prompt_length, response_length, block_size, device=valid.device
    )
    b = valid.shape[0]
    block_ids, noisy = block_ids.expand(b, -1), noisy.expand(b, -1)
    mask = block_diffusion_mask(block_ids, noisy, block_ids, noisy, valid)
    return mask, position_ids.expand(b, -1).contiguous()


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
