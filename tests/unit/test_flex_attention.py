"""FlexAttention core against the dense path, on CPU (forward; eager kernel, exact block masks).

Eager flex evaluates mask_mod on the whole grid and so ignores block sparsity: every BlockMask
is therefore also checked tile by tile (`_effective_mask`), so a wrong empty or full tile fails
here without a compile. One compiled forward checks the real sparse kernel (slow mark).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_opdlm.models import block_masks
from megatron_opdlm.models import flex_attention as fa
from megatron_opdlm.models import mask_functions as mf

# fp32 attention over <= 640 keys: flex and SDPA sum in different orders, ~1e-7 apart
ATOL = 1e-5


def _ragged_valid(batch: int, length: int, prompt: int, seed: int) -> torch.Tensor:
    """[b, length] bool: left padding inside the prompt, a response ending mid-block."""
    g = torch.Generator().manual_seed(seed)
    pads = torch.randint(0, prompt, (batch,), generator=g)
    ends = torch.randint(prompt + 1, length + 1, (batch,), generator=g)
    pads[0], ends[0] = 0, length
    cols = torch.arange(length)
    return (cols[None] >= pads[:, None]) & (cols[None] < ends[:, None])


def _layouts(batch: int = 4):
    """(name, columns, num_queries) for teacher, student, packed row and cached rounds."""
    p, r, block = 37, 296, 4  # S = 629: five 128-tiles; prompt not a multiple of the block
    valid = _ragged_valid(batch, p + r, p, seed=batch)
    packed_valid = torch.cat([valid, valid[:, p:]], dim=1)
    packed, _ = mf.packed_row_columns(p, r, block, packed_valid)
    return [
        ("teacher", mf.teacher_columns(valid), p + r),
        ("student_prefill", mf.student_columns(p + 8, p, block, valid[:, : p + 8]), p + 8),
        ("packed_row", packed, p + 2 * r),
        ("round", mf.rollout_round_columns(p + 96, block, p, block, valid), block),
        ("fused_commit", mf.rollout_round_columns(p + 92, 2 * block, p, block, valid), 2 * block),
    ]


def _effective_mask(bm, b: int, q_len: int, kv_len: int) -> torch.Tensor:
    """[b, Q, K] what a sparse kernel computes: full tiles all True, partial tiles mask_mod,
    absent tiles False."""
    tile = block_masks.TILE
    out = torch.zeros(b, q_len, kv_len, dtype=torch.bool)
    q_idx, kv_idx = torch.arange(q_len)[:, None], torch.arange(kv_len)[None]
    for row in range(b):
        src = min(row, bm.kv_num_blocks.shape[0] - 1)
        values = bm.mask_mod(torch.tensor(row), torch.tensor(0), q_idx, kv_idx)
        values = values.expand(q_len, kv_len)
        for qt in range(bm.kv_num_blocks.shape[-1]):
            rows = slice(qt * tile, (qt + 1) * tile)
            for kind, num, idx in (
                ("partial", bm.kv_num_blocks, bm.kv_indices),
                ("full", bm.full_kv_num_blocks, bm.full_kv_indices),
            ):
                for j in idx[src, 0, qt, : int(num[src, 0, qt])].tolist():
                    cols = slice(j * tile, (j + 1) * tile)
                    out[row, rows, cols] = values[rows, cols] if kind == "partial" else True
    return out


LAYOUTS = _layouts()
NAMES = [name for name, _, _ in LAYOUTS]


@pytest.mark.parametrize("name,columns,num_queries", LAYOUTS, ids=NAMES)
def test_block_mask_tiles_equal_predicate(name, columns, num_queries):
    block_masks.STRUCTURES.clear()
    bm = block_masks.build_block_mask(columns, num_queries)
    b, _, k = columns.shape
    q_pad, k_pad = block_masks.padded_lengths(num_queries, k)
    effective = _effective_mask(bm, b, q_pad, k_pad)[:, :num_queries, :k]
    assert torch.equal(effective, mf.dense_allowed(columns, num_queries)), name
    if name == "packed_row":
        assert int(bm.full_kv_num_blocks.sum()) > 0  # full tiles exist (and were checked)


def test_structure_cache_hits_on_repeated_layout_and_not_on_new_one():
    cache = block_masks.StructureCache()
    _, columns, n = _layouts()[2]
    first = block_masks.build_block_mask(columns, n, cache=cache)
    # same layout, different padding: the structure is reused, the padding still applies
    other = columns.clone()
    other[:, mf.VALID_ROW, :20] = 0
    second = block_masks.build_block_mask(other, n, cache=cache)
    assert (cache.builds, cache.hits) == (1, 1)
    assert not torch.equal(first.kv_num_blocks, second.kv_num_blocks) or not torch.equal(
        first.full_kv_num_blocks, second.full_kv_num_blocks
    )
    effective = _effective_mask(second, 4, *block_masks.padded_lengths(n, columns.shape[-1]))
    assert torch.equal(effective[:, :n, : columns.shape[-1]], mf.dense_allowed(other, n))
    block_masks.build_block_mask(mf.teacher_columns(torch.ones(4, 333, dtype=torch.bool)), 333,
                                 cache=cache)  # fmt: skip
    assert cache.builds == 2


def test_bucket_lengths():
    assert [block_masks.bucket_length(n) for n in (5, 128, 129, 300, 513, 1100, 2100, 9024)] == [
        128, 128, 256, 384, 640, 1280, 2560, 10240,
    ]  # fmt: skip
    assert block_masks.padded_lengths(4, 629) == (4, 640)  # cached rounds keep their queries


def _qkv(b, heads, groups, sq, sk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, sq, 16, generator=g)
    k, v = (torch.randn(b, groups, sk, 16, generator=g) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("name,columns,num_queries", LAYOUTS, ids=NAMES)
def test_flex_forward_equals_dense(name, columns, num_queries):
    b, _, k = columns.shape
    q, key, value = _qkv(b, 4, 2, num_queries, k)  # GQA: 4 heads over 2 groups
    dense = mf.dense_allowed(columns, num_queries)[:, None]
    expected = F.scaled_dot_product_attention(q, key, value, attn_mask=dense, enable_gqa=True)
    with torch.no_grad():
        got = fa.attention(q, key, value, columns)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # the comparison can fail: a causal mask in place of the pattern
    causal = mf.teacher_columns(columns[:, mf.VALID_ROW].bool())
    if name in ("packed_row", "student_prefill"):
        with torch.no_grad():
            wrong = fa.attention(q, key, value, causal)
        assert (wrong - expected).abs().max() > 1e-2


def test_cpu_training_falls_back_to_dense_with_grads():
    _, columns, n = _layouts(2)[2]
    q, key, value = (t.requires_grad_() for t in _qkv(2, 4, 4, n, n))
    got = fa.attention(q, key, value, columns)
    got.square().sum().backward()
    grads = [t.grad.clone() for t in (q, key, value)]
    for t in (q, key, value):
        t.grad = None
    dense = mf.dense_allowed(columns, n)[:, None]
    F.scaled_dot_product_attention(q, key, value, attn_mask=dense).square().sum().backward()
    for got_grad, t in zip(grads, (q, key, value), strict=True):
        torch.testing.assert_close(got_grad, t.grad, atol=ATOL, rtol=0)


def test_dense_masks_and_none_are_accepted():
    valid = _ragged_valid(2, 50, 10, seed=3)
    columns = mf.teacher_columns(valid)
    q, key, value = _qkv(2, 2, 2, 50, 50)
    with torch.no_grad():
        from_columns = fa.attention(q, key, value, columns)
        from_dense = fa.attention(q, key, value, mf.dense_mask(columns))
        causal = fa.attention(q, key, value, None, fa.AttnMaskType.causal)
    torch.testing.assert_close(from_dense, from_columns, atol=ATOL, rtol=0)
    expected = F.scaled_dot_product_attention(q, key, value, is_causal=True)
    torch.testing.assert_close(causal, expected, atol=ATOL, rtol=0)


def test_backend_resolution():
    on_gpu = torch.cuda.is_available()
    assert fa.resolve_attention_backend("auto", "local") == ("flex" if on_gpu else "local")
    assert fa.resolve_attention_backend("flex", "local") == "flex"
    with pytest.raises(ValueError, match="attention_backend=te"):
        fa.resolve_attention_backend("te", "local")
    with pytest.raises(ValueError, match="must be one of"):
        fa.resolve_attention_backend("sdpa", "local")


@pytest.mark.slow
def test_compiled_flex_forward_equals_dense_cpu():
    """The sparse compiled kernel (full / partial / empty tiles all exercised) on a CPU."""
    fa.prepare_cpu_compile()
    name, columns, n = _layouts(2)[2]
    q, key, value = _qkv(2, 4, 2, n, n)
    dense = mf.dense_allowed(columns, n)[:, None]
    expected = F.scaled_dot_product_attention(q, key, value, attn_mask=dense, enable_gqa=True)
    with torch.no_grad():
        got = fa.attention(q, key, value, columns, compile=True)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
