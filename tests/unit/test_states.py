"""State selection from a rollout's step map: per-block, global and random masking."""

from __future__ import annotations

import pytest
import torch

from megatron_opdlm.diffusion.rollout_types import RolloutBatch
from megatron_opdlm.diffusion.states import mask_ratio_per_position, select_states

MASK = 99
PAD = 0
EOS = 1


def make_rollout(
    prompt_lengths: list[int],
    response_lengths: list[int],
    prompt_width: int,
    response_width: int,
    block_size: int,
    steps_per_block: int,
    vocab: int = 50,
    seed: int = 0,
    end_with_eos: bool = True,
) -> RolloutBatch:
    """A hand-built rollout as the sampler would return it.

    Left-padded prompts, right-padded responses of the given lengths (EOS last when
    `end_with_eos`), and a step map in which each block used rounds 0..k-1 (k drawn in
    [1, steps_per_block]), every round unmasking at least one token, like the sampler.
    """
    g = torch.Generator().manual_seed(seed)
    b = len(prompt_lengths)
    prompt = torch.full((b, prompt_width), PAD)
    prompt_valid = torch.zeros(b, prompt_width, dtype=torch.bool)
    response = torch.full((b, response_width), PAD)
    valid = torch.zeros(b, response_width, dtype=torch.bool)
    step_map = torch.full((b, response_width), -1)
    for row, (pl, rl) in enumerate(zip(prompt_lengths, response_lengths)):
        prompt[row, prompt_width - pl :] = torch.randint(2, vocab, (pl,), generator=g)
        prompt_valid[row, prompt_width - pl :] = True
        response[row, :rl] = torch.randint(2, vocab, (rl,), generator=g)
        if end_with_eos and rl:
            response[row, rl - 1] = EOS
        valid[row, :rl] = True
        for start in range(0, rl, block_size):
            n = min(block_size, rl - start)
            k = int(torch.randint(1, min(steps_per_block, n) + 1, (1,), generator=g))
            rounds = torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=g)])
            step_map[row, start : start + n] = rounds[torch.randperm(n, generator=g)]
    return RolloutBatch(
        prompt_tokens=prompt,
        prompt_valid=prompt_valid,
        response_tokens=response,
        response_valid=valid,
        step_map=step_map,
        num_forwards=torch.zeros(b, dtype=torch.long),
    )


def _rollout():
    # row 1 ends mid-block (positions 9..11 padding); row 2 has an empty last block
    return make_rollout([3, 5, 2], [12, 9, 8], 5, 12, block_size=4, steps_per_block=4, seed=3)


def test_per_block_state_is_a_round_the_block_ran_drawn_uniformly():
    rollout, block = _rollout(), 4
    counts = {}  # (row, block) -> counts per round
    g = torch.Generator().manual_seed(0)
    draws = 1500
    for _ in range(draws):
        x_t = select_states(rollout, "per_block", block, MASK, 4, g)
        masked = x_t == MASK
        assert not (masked & ~rollout.response_valid).any()
        assert torch.equal(x_t[~masked], rollout.response_tokens[~masked])
        for row in range(3):
            for blk in range(3):
                cols = slice(blk * block, (blk + 1) * block)
                step, valid = rollout.step_map[row, cols], rollout.response_valid[row, cols]
                if not valid.any():
                    assert not masked[row, cols].any()
                    continue
                ran = int(step.max()) + 1
                state = masked[row, cols]
                matches = [r for r in range(ran) if torch.equal(state, valid & (step >= r))]
                assert len(matches) == 1, "block state is not 'unmasked in round r or later'"
                counts.setdefault((row, blk), torch.zeros(ran))[matches[0]] += 1
    assert any(len(c) > 1 for c in counts.values())
    for freq in counts.values():
        # uniform over the rounds the block ran; 5 sigma of a binomial frequency at p=1/2
        tolerance = 5 * (0.25 / draws) ** 0.5
        assert torch.allclose(freq / draws, torch.full_like(freq, 1 / len(freq)), atol=tolerance)


def test_global_state_uses_one_round_for_every_block_of_a_row():
    rollout = _rollout()
    g = torch.Generator().manual_seed(1)
    seen = {row: set() for row in range(3)}
    for _ in range(300):
        masked = select_states(rollout, "global", 4, MASK, 4, g) == MASK
        for row in range(3):
            step, valid = rollout.step_map[row], rollout.response_valid[row]
            ran = int(step.max()) + 1
            matches = [r for r in range(ran) if torch.equal(masked[row], valid & (step >= r))]
            assert len(matches) == 1
            seen[row].add(matches[0])
    for row in range(3):
        assert seen[row] == set(range(int(rollout.step_map[row].max()) + 1))


def test_random_masks_at_least_one_per_block_never_padding_and_mean_ratio():
    rollout = make_rollout([4] * 8, [16, 16, 16, 16, 16, 16, 13, 0], 4, 16, 4, 4, seed=5)
    g = torch.Generator().manual_seed(2)
    fractions = []
    for _ in range(200):
        masked = select_states(rollout, "random", 4, MASK, 4, g) == MASK
        assert not (masked & ~rollout.response_valid).any()
        per_block = masked.view(8, 4, 4).sum(2)
        has_valid = rollout.response_valid.view(8, 4, 4).any(2)
        assert (per_block[has_valid] >= 1).all() and (per_block[~has_valid] == 0).all()
        fractions.append(masked[:6].float().view(-1, 4).mean(1))  # full blocks only
    mean = torch.cat(fractions).mean().item()
    # Bernoulli(t), t ~ U(0,1), plus one forced mask when none: E = 1/2 + P(none)/4 with
    # P(none) = integral of (1-t)^4 = 1/5, so 0.55; 4800 blocks with per-block std ~0.3:
    # 0.02 is ~4.6 sigma
    assert abs(mean - 0.55) < 0.02


def test_same_generator_state_same_states_and_bad_input_is_refused():
    rollout = _rollout()
    for mode in ("per_block", "global", "random"):
        a = select_states(rollout, mode, 4, MASK, 4, torch.Generator().manual_seed(7))
        b = select_states(rollout, mode, 4, MASK, 4, torch.Generator().manual_seed(7))
        assert torch.equal(a, b)
    g = torch.Generator()
    with pytest.raises(ValueError, match="steps_per_block"):
        select_states(rollout, "per_block", 4, MASK, 2, g)
    with pytest.raises(ValueError, match="multiple of block size"):
        select_states(rollout, "per_block", 5, MASK, 4, g)
    with pytest.raises(ValueError, match="not one of"):
        select_states(rollout, "everything", 4, MASK, 4, g)


def test_mask_ratio_per_position():
    valid = torch.tensor([[True, True, True, False, True, True, True, True]])
    masked = torch.tensor([[True, False, False, False, True, True, True, True]])
    ratio = mask_ratio_per_position(masked, valid, 4)
    assert torch.allclose(ratio, torch.tensor([[1 / 3] * 4 + [1.0] * 4]))


def test_mode_for_distillation_modes():
    from megatron_opdlm.diffusion.states import mode_for

    assert mode_for("opdlm", "global") == "global"
    assert mode_for("opdlm", "per_block") == "per_block"
    for baseline in ("opdlm_off", "offpolicy", "mdlm_sft"):
        assert mode_for(baseline, "per_block") == "random"
