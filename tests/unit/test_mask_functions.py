"""Every dense mask, now evaluated from `models.mask_functions`, equals the builders of the parent
commit (f91ed8a, frozen below) exactly, on ragged batches with EOS mid-block."""

from __future__ import annotations

import itertools

import pytest
import torch

from megatron_opdlm.models import mask_functions as mf
from megatron_opdlm.models import masks


# ---- frozen reference: models/masks.py and CachedBlockForward._mask at f91ed8a -------------------
def _ref_block_diffusion_mask(
    query_block, query_noisy, key_block, key_noisy, key_valid=None, query_is_key_offset=0
):
    qb, kb = query_block[:, :, None], key_block[:, None, :]
    qn, kn = query_noisy[:, :, None], key_noisy[:, None, :]
    clean_key = ~kn & ((~qn & (kb <= qb)) | (qn & (kb < qb)))
    noisy_key = kn & qn & (kb == qb)
    allowed = clean_key | noisy_key
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
        if query_is_key_offset is not None:
            s_q, s_k = query_block.shape[1], key_block.shape[1]
            rows = torch.arange(s_q, device=allowed.device)
            cols = rows + query_is_key_offset
            inside = cols < s_k
            rows, cols = rows[inside], cols[inside]
            invalid_query = ~key_valid[:, cols]
            allowed[:, rows, cols] |= invalid_query
    return ~allowed[:, None, :, :]


def _ref_block_causal_mask(length, response_start, block_size, valid=None, batch=1):
    positions = torch.arange(length)
    blocks = torch.div(positions - response_start, block_size, rounding_mode="floor")
    b = valid.shape[0] if valid is not None else batch
    blocks = blocks.expand(b, length)
    clean = torch.zeros(b, length, dtype=torch.bool)
    return _ref_block_diffusion_mask(blocks, clean, blocks, clean, valid)


def _ref_causal_mask(valid):
    b, length = valid.shape
    return _ref_block_causal_mask(length, 0, 1, valid=valid, batch=b)


def _ref_packed_row_mask(p, r, block_size, valid):
    clean_positions, noisy_positions = torch.arange(p + r), torch.arange(p, p + r)
    position_ids = torch.cat([clean_positions, noisy_positions])
    block_ids = torch.div(position_ids - p, block_size, rounding_mode="floor")
    noisy = torch.cat([torch.zeros(p + r, dtype=torch.bool), torch.ones(r, dtype=torch.bool)])
    b = valid.shape[0]
    block_ids, noisy = block_ids.expand(b, -1), noisy.expand(b, -1)
    mask = _ref_block_diffusion_mask(block_ids, noisy, block_ids, noisy, valid)
    return mask, position_ids.expand(b, -1).contiguous()


def _ref_round_mask(offset, num_queries, prompt_length, block_size, key_valid):
    keys = offset + num_queries
    b = key_valid.shape[0]
    key_block = torch.div(
        torch.arange(keys) - prompt_length, block_size, rounding_mode="floor"
    ).expand(b, -1)
    clean = torch.zeros(b, keys, dtype=torch.bool)
    return _ref_block_diffusion_mask(
        key_block[:, offset:], clean[:, offset:], key_block, clean, key_valid[:, :keys],
        query_is_key_offset=offset,
    )  # fmt: skip


# ---- ragged batches ---------------------------------------------------------------------------
def _ragged(batch: int, p: int, r: int, block: int, seed: int):
    """(prompt_valid [b, P], response_valid [b, R]): left-padded prompts of random widths and
    responses ending at a random column (an EOS mid-block), row 0 full, one row empty-ish."""
    g = torch.Generator().manual_seed(seed)
    pads = torch.randint(0, p, (batch,), generator=g)
    pads[0] = 0
    ends = torch.randint(1, r + 1, (batch,), generator=g)
    ends[0] = r
    if batch > 1:
        ends[-1] = block // 2 + 1  # EOS inside the first block
    cols_p, cols_r = torch.arange(p), torch.arange(r)
    return cols_p[None] >= pads[:, None], cols_r[None] < ends[:, None]


CASES = list(itertools.product([1, 4, 8], [1, 4, 8]))  # (batch size, block size)


@pytest.mark.parametrize("batch,block", CASES)
def test_dense_masks_equal_parent_commit_exactly(batch, block):
    p, r = 11, 4 * block if block > 1 else 7  # prompt width not a multiple of the block
    prompt_valid, response_valid = _ragged(batch, p, r, block, seed=batch * 10 + block)
    checked = 0
    # student packed row
    valid = torch.cat([prompt_valid, response_valid, response_valid], dim=1)
    mask, positions = masks.packed_row_mask(p, r, block, valid)
    ref_mask, ref_positions = _ref_packed_row_mask(p, r, block, valid)
    assert mask.dtype == torch.bool and torch.equal(mask, ref_mask)
    assert torch.equal(positions, ref_positions)
    checked += 1
    # teacher [prompt | x0]
    teacher_valid = valid[:, : p + r]
    assert torch.equal(masks.causal_mask(teacher_valid), _ref_causal_mask(teacher_valid))
    # rollout: full forwards and the cached prefill over [prompt | committed blocks]
    key_valid = torch.cat([prompt_valid, response_valid], dim=1)
    for length in (p, p + block, p + r):
        got = masks.block_causal_mask(length, p, block, valid=key_valid[:, :length])
        ref = _ref_block_causal_mask(length, p, block, valid=key_valid[:, :length])
        assert torch.equal(got, ref)
        checked += 1
    assert torch.equal(masks.block_causal_mask(9, 3, block, batch=batch),
                       _ref_block_causal_mask(9, 3, block, batch=batch))  # fmt: skip
    # cached rounds: one block, and a fused commit (finished block + new block)
    for offset, n in ((p, block), (p + block, 2 * block), (p, 1)):
        got = masks.attention_input(
            mf.rollout_round_columns(offset, n, p, block, key_valid), "dense", num_queries=n
        )
        assert torch.equal(got, _ref_round_mask(offset, n, p, block, key_valid))
        checked += 1
    assert checked == 7


def test_general_rule_equals_parent_on_explicit_columns():
    g = torch.Generator().manual_seed(0)
    b, s_q, s_k = 4, 9, 13
    qb = torch.randint(-2, 3, (b, s_q), generator=g)
    kb = torch.randint(-2, 3, (b, s_k), generator=g)
    qn, kn = torch.rand(b, s_q, generator=g) < 0.5, torch.rand(b, s_k, generator=g) < 0.5
    kv = torch.rand(b, s_k, generator=g) < 0.7
    for valid, offset in ((None, 0), (kv, 0), (kv, 4), (kv, None), (kv, 10)):
        got = masks.block_diffusion_mask(qb, qn, kb, kn, valid, offset)
        assert torch.equal(got, _ref_block_diffusion_mask(qb, qn, kb, kn, valid, offset))


def test_comparison_can_fail():
    # a causal mask in place of the packed row's differs from the parent's packed mask
    p, r, block = 5, 8, 4
    valid = torch.ones(2, p + 2 * r, dtype=torch.bool)
    causal = masks.causal_mask(valid)
    assert not torch.equal(causal, _ref_packed_row_mask(p, r, block, valid)[0])


def test_descriptor_round_trip_and_detection():
    valid = torch.tensor([[False, True, True, True, True, True]])
    columns = mf.student_columns(6, 2, 2, valid=valid)
    assert columns.shape == (1, 3, 6) and columns.dtype == torch.int32
    assert mf.is_descriptor(columns) and not mf.is_descriptor(mf.dense_mask(columns))
    block, noisy, got_valid = mf.unpack(columns)
    assert block.tolist() == [[-1, -1, 0, 0, 1, 1]] and not noisy.any()
    assert torch.equal(got_valid, valid)
    assert torch.equal(masks.attention_input(columns, "columns"), columns)
    with pytest.raises(ValueError, match="mask format"):
        masks.attention_input(columns, "sparse")
