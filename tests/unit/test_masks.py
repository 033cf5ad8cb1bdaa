"""Mask builders against a per-position reference written from the rules in models/masks.py."""

from __future__ import annotations

import torch

from megatron_opdlm.models import masks


def _reference_allowed(q_block, q_noisy, k_block, k_noisy) -> bool:
    if not k_noisy:
        return k_block <= q_block if not q_noisy else k_block < q_block
    return q_noisy and k_block == q_block


def test_packed_row_mask_matches_rules():
    p, r, block = 6, 8, 4
    valid = torch.ones(1, p + 2 * r, dtype=torch.bool)
    mask, positions = masks.packed_row_mask(p, r, block, valid)
    blocks, noisy, _ = masks.packed_row_layout(p, r, block)
    s = p + 2 * r
    for q in range(s):
        for k in range(s):
            allowed = _reference_allowed(
                int(blocks[q]), bool(noisy[q]), int(blocks[k]), bool(noisy[k])
            )
            assert bool(mask[0, 0, q, k]) == (not allowed), (q, k)
    # x_t block b copies the positions of x0 block b
    assert torch.equal(positions[0, p + r :], positions[0, p : p + r])


def test_prompt_blocks_end_at_response_start():
    # P = 6, B = 4: prompt columns 0-1 form block -2, columns 2-5 block -1; response starts a block
    blocks = masks.aligned_block_ids(torch.arange(10), response_start=6, block_size=4)
    assert blocks.tolist() == [-2, -2, -1, -1, -1, -1, 0, 0, 0, 0]


def test_padding_keys_hidden_and_pad_queries_see_themselves():
    valid = torch.tensor([[False, False, True, True, True, True]])
    mask = masks.block_causal_mask(6, response_start=2, block_size=2, valid=valid)
    assert mask[0, 0, 2:, :2].all()  # no real query sees padding
    assert not mask[0, 0, 0, 0] and mask[0, 0, 0, 1:].all()  # pad query: only itself
    assert not mask[0, 0, 2, 3]  # same block is bidirectional


def test_block_size_one_is_causal():
    valid = torch.ones(2, 7, dtype=torch.bool)
    expected = torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)
    assert torch.equal(masks.causal_mask(valid)[0, 0], expected)


def test_xt_logit_columns_with_and_without_shift():
    p, r, block = 3, 8, 4
    assert masks.xt_logit_columns(p, r, block, token_shift=False).tolist() == list(range(11, 19))
    shifted = masks.xt_logit_columns(p, r, block, token_shift=True).tolist()
    # block starts read the clean column before them (prompt end, x0 of the previous block)
    assert shifted == [2, 11, 12, 13, 6, 15, 16, 17]
