"""Rollout and training see the same masks (the EOS block included), through the real sampler.

A round callback records each round's logits and the block state x before the round; the packed
training row built from the rollout, with that state as x_t, must give the same logits at the
masked x_t positions. Ragged prompts, EOS in the middle of a block, cached and no-cache paths.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_opdlm.diffusion.packing import pack_batch
from megatron_opdlm.diffusion.sampler import generate
from megatron_opdlm.diffusion.states import select_states
from megatron_opdlm.models.vocab import mask_invalid_logits
from tests.tiny import tiny_student

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24]]
NEW_TOKENS = 24
BLOCK = 4


@pytest.fixture(scope="module")
def tiny():
    with tiny_student("rollout.temperature=0", "rollout.remasking=static") as (config, chunks):
        chunks[0].eval()
        yield config, chunks


def _eos_mid_block(config, chunks, diffusion_cfg, rollout_cfg):
    """(model config, row, column): a token that `row` first decodes in the middle of a block of
    blocks 1-4, made the EOS id."""
    never = dataclasses.replace(config.model, eos_token_ids=[119])  # a token this model avoids
    plain = generate(chunks, PROMPTS, never, diffusion_cfg, rollout_cfg, NEW_TOKENS)
    for row, tokens in enumerate(plain.response_tokens.tolist()):
        for column in range(BLOCK, NEW_TOKENS - BLOCK):
            token = tokens[column]
            if tokens.index(token) == column and column % BLOCK in (1, 2):
                return dataclasses.replace(config.model, eos_token_ids=[token]), row, column
    raise AssertionError("no mid-block token found for the EOS (change the prompts)")


@pytest.mark.parametrize("use_kv_cache,token_shift", [(True, True), (False, True), (True, False)])
def test_training_row_gives_the_rollout_logits_of_every_round(tiny, use_kv_cache, token_shift):
    config, chunks = tiny
    diffusion_cfg = dataclasses.replace(config.diffusion, token_shift=token_shift)
    rollout_cfg = dataclasses.replace(config.rollout, use_kv_cache=use_kv_cache)
    model_cfg, eos_row, eos_column = _eos_mid_block(config, chunks, diffusion_cfg, rollout_cfg)
    rounds = []
    rollout = generate(
        chunks, PROMPTS, model_cfg, diffusion_cfg, rollout_cfg, NEW_TOKENS,
        round_callback=lambda *args: rounds.append(args),
    )  # fmt: skip
    lengths = rollout.response_lengths()
    assert int(lengths[eos_row]) == eos_column + 1, "the row ends at its mid-block EOS"
    assert int(lengths.min()) < rollout.response_length, "ragged: rows end at different blocks"
    eos_block = eos_column // BLOCK
    compared_tail = 0
    for block, _, logits, x, masked, _ in rounds:
        active = masked.any(dim=1)  # [b]; finished rows take no part in the round
        columns = slice(block * BLOCK, (block + 1) * BLOCK)
        x_t = rollout.response_tokens.clone()  # [b, R], the state before this round
        x_t[active, columns] = x[active]
        packed = pack_batch(rollout, x_t, model_cfg, diffusion_cfg, exclude_eos=False)
        with torch.no_grad():
            full = chunks[0](packed.tokens, packed.position_ids, packed.attention_mask)
        train_logits = mask_invalid_logits(full[:, packed.logit_columns[columns]], model_cfg)
        where = masked & active[:, None]  # [b, B] positions this round predicts
        # fp32: the same keys in another order of summation (training row vs the rollout's
        # forward); measured <= 1e-6 here; hiding the EOS block's tail (the
        # old training row) gives 2.6
        torch.testing.assert_close(train_logits[where], logits[where], rtol=0, atol=1e-5)
        if block == eos_block and bool(masked[eos_row, eos_column % BLOCK + 1 :].any()):
            compared_tail += 1  # the tail after EOS still masked: a state of the EOS block
    assert compared_tail > 0, "some round of the EOS block had masked positions after the EOS"


def test_selected_states_of_the_eos_block_are_states_the_sampler_saw(tiny):
    config, chunks = tiny
    model_cfg, row, eos_column = _eos_mid_block(config, chunks, config.diffusion, config.rollout)
    states = []
    rollout = generate(
        chunks, PROMPTS, model_cfg, config.diffusion, config.rollout, NEW_TOKENS,
        round_callback=lambda block, r, logits, x, masked, select: states.append(
            (block, x[row].clone()) if bool(masked[row].any()) else None
        ),
    )  # fmt: skip
    seen = {(block, tuple(x.tolist())) for block, x in filter(None, states)}
    eos_block = eos_column // BLOCK
    columns = slice(eos_block * BLOCK, (eos_block + 1) * BLOCK)
    drawn = set()
    for seed in range(40):
        x_t = select_states(
            rollout, "per_block", BLOCK, model_cfg.student_mask_token_id,
            config.rollout.steps_per_block, torch.Generator().manual_seed(seed),
        )  # fmt: skip
        drawn.add(tuple(x_t[row, columns].tolist()))
    assert drawn <= {x for block, x in seen if block == eos_block}, "each draw is a seen state"
    assert len(drawn) > 1
