"""Packing rollouts into student rows [prompt | x0 | x_t] and teacher rows; the loss mask."""

from __future__ import annotations

import pytest
import torch

from megatron_opdlm.config import DiffusionConfig, ModelConfig
from megatron_opdlm.diffusion.packing import pack_batch, split_micro_batches
from megatron_opdlm.diffusion.rollout_types import RolloutBatch
from megatron_opdlm.diffusion.states import select_states
from tests.unit.test_states import make_rollout

MODEL = ModelConfig(vocab_size=50, vocab_pad_multiple=8, eos_token_ids=[1], pad_token_id=0)
MASK = MODEL.student_mask_token_id  # 50, the added row


def _hand_rollout(x0_rows, valid_rows, prompt_width=2):
    x0 = torch.tensor(x0_rows)
    b = x0.shape[0]
    valid = torch.tensor(valid_rows, dtype=torch.bool)
    return RolloutBatch(
        prompt_tokens=torch.full((b, prompt_width), 7),
        prompt_valid=torch.ones(b, prompt_width, dtype=torch.bool),
        response_tokens=x0.masked_fill(~valid, 0),
        response_valid=valid,
        step_map=torch.zeros_like(x0).masked_fill(~valid, -1),
        num_forwards=torch.zeros(b, dtype=torch.long),
    )


def _all_masked(rollout):
    return rollout.response_tokens.masked_fill(rollout.response_valid, MASK)


def test_eos_cut_and_eos_exclusion_on_a_hand_built_row():
    # EOS (id 1) at position 2 and again at 5; everything masked. Loss: positions 0, 1, 2 -> 3;
    # excluding the EOS -> 2. Tokens after the first EOS never count, even where valid.
    rollout = _hand_rollout([[5, 6, 1, 7, 8, 1, 9, 9]], [[True] * 8])
    diffusion = DiffusionConfig(block_size=4)
    packed = pack_batch(rollout, _all_masked(rollout), MODEL, diffusion, exclude_eos=False)
    assert packed.loss_mask.tolist() == [[True, True, True] + [False] * 5]
    assert packed.num_loss_tokens == 3
    packed = pack_batch(rollout, _all_masked(rollout), MODEL, diffusion, exclude_eos=True)
    assert packed.loss_mask.tolist() == [[True, True] + [False] * 6]
    assert packed.num_loss_tokens == 2


def test_padded_positions_and_unmasked_positions_are_not_in_the_loss():
    # row 0: 6 valid tokens, EOS last, positions 2 and 4 left clean in x_t -> masked & valid = 4
    # row 1: response entirely padding (a row the rollout padded the batch with) -> 0
    # row 2: no EOS, 5 valid, all masked -> 5
    x0 = [[5, 6, 7, 8, 9, 1, 0, 0], [0] * 8, [4, 4, 4, 4, 4, 0, 0, 0]]
    valid = [[True] * 6 + [False] * 2, [False] * 8, [True] * 5 + [False] * 3]
    rollout = _hand_rollout(x0, valid)
    x_t = _all_masked(rollout)
    x_t[0, 2], x_t[0, 4] = 7, 9
    packed = pack_batch(rollout, x_t, MODEL, DiffusionConfig(block_size=4), exclude_eos=False)
    assert packed.loss_mask.sum(1).tolist() == [4, 0, 5]
    assert packed.num_loss_tokens == 9
    assert packed.num_loss_sequences == 2
    assert not (packed.loss_mask & ~rollout.response_valid).any()
    excluded = pack_batch(rollout, x_t, MODEL, DiffusionConfig(block_size=4), exclude_eos=True)
    assert excluded.loss_mask.sum(1).tolist() == [3, 0, 5]


def _reference_row_mask(p, r, block, valid):
    """[b, 1, S, S] True = masked, by the rule in words, one (query, key) pair at a time:
    a clean column (prompt or x0) sees clean columns of its block and earlier blocks; an x_t
    column sees clean columns of earlier blocks and the x_t columns of its own block; padding is
    never seen, except that a pad query sees itself. Blocks are aligned so one starts at P."""
    b, s = valid.shape

    def kind_and_block(column):
        noisy = column >= p + r
        position = column - r if noisy else column
        return noisy, (position - p) // block  # the prompt's blocks are negative

    mask = torch.ones(b, 1, s, s, dtype=torch.bool)
    for row in range(b):
        for q in range(s):
            q_noisy, q_block = kind_and_block(q)
            for k in range(s):
                k_noisy, k_block = kind_and_block(k)
                if q_noisy:
                    allowed = (not k_noisy and k_block < q_block) or (
                        k_noisy and k_block == q_block
                    )
                else:
                    allowed = not k_noisy and k_block <= q_block
                allowed = allowed and bool(valid[row, k])
                allowed |= q == k and not bool(valid[row, q])
                mask[row, 0, q, k] = not allowed
    return mask


def test_rows_columns_masks_and_positions():
    rollout = make_rollout([3, 5], [8, 6], 5, 8, block_size=4, steps_per_block=4, seed=1)
    x_t = select_states(rollout, "per_block", 4, MASK, 4, torch.Generator().manual_seed(0))
    for shift in (False, True):
        diffusion = DiffusionConfig(block_size=4, token_shift=shift)
        packed = pack_batch(rollout, x_t, MODEL, diffusion, exclude_eos=False)
        p, r = 5, 8
        assert packed.tokens.shape == (2, p + 2 * r)
        assert torch.equal(packed.tokens[:, :p], rollout.prompt_tokens)
        assert torch.equal(packed.tokens[:, p : p + r], rollout.response_tokens)
        assert torch.equal(packed.tokens[:, p + r :], x_t)
        valid = torch.cat([rollout.prompt_valid, rollout.response_valid, rollout.response_valid], 1)
        assert torch.equal(packed.valid, valid)
        # against rules written out by hand (not the builders that made them)
        assert torch.equal(packed.attention_mask, _reference_row_mask(p, r, 4, valid))
        positions = list(range(p + r)) + list(range(p, p + r))  # x_t copies x0's positions
        assert packed.position_ids.tolist() == [positions, positions]
        # token shift: r % B == 0 reads the last clean column before its block (P + r - 1),
        # else the x_t column of r - 1; without shift, the x_t column of r itself
        xt = p + r  # first x_t column
        columns = [(p + i - 1 if i % 4 == 0 else xt + i - 1) if shift else xt + i for i in range(r)]
        assert packed.logit_columns.tolist() == columns
        assert torch.equal(packed.teacher_tokens, packed.tokens[:, : p + r])
        teacher_valid = valid[:, : p + r]
        for row in range(2):
            for q in range(p + r):
                for k in range(p + r):
                    allowed = k <= q and bool(teacher_valid[row, k])
                    allowed |= k == q and not teacher_valid[row, q]  # a pad query sees itself
                    assert bool(packed.teacher_attention_mask[row, 0, q, k]) == (not allowed)
        assert torch.equal(packed.teacher_position_ids[0], torch.arange(p + r))
        # the loss covers exactly the masked valid positions (no EOS inside these responses
        # except the last valid token, which is included)
        expected = (x_t == MASK) & rollout.response_valid
        assert torch.equal(packed.loss_mask, expected)


def test_split_micro_batches_partitions_the_rows():
    rollout = make_rollout([3, 5, 2, 4], [8, 6, 4, 8], 5, 8, 4, 4, seed=2)
    x_t = select_states(rollout, "random", 4, MASK, 4, torch.Generator().manual_seed(0))
    packed = pack_batch(rollout, x_t, MODEL, DiffusionConfig(block_size=4), exclude_eos=False)
    parts = split_micro_batches(packed, 2)
    assert len(parts) == 2
    assert torch.equal(torch.cat([m.tokens for m in parts]), packed.tokens)
    assert torch.equal(torch.cat([m.attention_mask for m in parts]), packed.attention_mask)
    assert torch.equal(parts[1].logit_columns, packed.logit_columns)
    assert sum(m.num_loss_tokens for m in parts) == packed.num_loss_tokens
    with pytest.raises(ValueError, match="micro-batches of 3"):
        split_micro_batches(packed, 3)


def test_inconsistent_input_is_refused():
    rollout = make_rollout([3, 5], [8, 6], 5, 8, 4, 4, seed=1)
    x_t = rollout.response_tokens.clone()
    x_t[0, 0] = 3 if int(x_t[0, 0]) != 3 else 4  # changed but not masked
    with pytest.raises(ValueError, match="not a valid masked position"):
        pack_batch(rollout, x_t, MODEL, DiffusionConfig(block_size=4), exclude_eos=False)
    with pytest.raises(ValueError, match="multiple of diffusion.block_size"):
        pack_batch(rollout, rollout.response_tokens, MODEL, DiffusionConfig(block_size=3), False)
    right_padded = make_rollout([3, 5], [8, 6], 5, 8, 4, 4, seed=1)
    right_padded.prompt_valid = right_padded.prompt_valid.flip(1)
    with pytest.raises(ValueError, match="left-padded"):
        pack_batch(right_padded, right_padded.response_tokens, MODEL, DiffusionConfig(4), False)
