"""Remasking strategies: static schedule counts, dynamic threshold and floor, the registry."""

from __future__ import annotations

import pytest
import torch

from megatron_opdlm.config import RolloutConfig
from megatron_opdlm.diffusion.remasking import (
    available_strategies,
    get_remasking,
    register_remasking,
    round_schedule,
)


@pytest.mark.parametrize(
    "block,steps,expected",
    [(4, 4, [1, 1, 1, 1]), (4, 2, [2, 2]), (4, 1, [4]), (4, 3, [2, 1, 1]), (8, 3, [3, 3, 2])],
)
def test_round_schedule_sums_to_block(block, steps, expected):
    assert round_schedule(block, steps) == expected


def test_round_schedule_rejects_more_steps_than_tokens():
    with pytest.raises(ValueError, match="steps_per_block=5"):
        round_schedule(4, 5)


@pytest.mark.parametrize("block,steps", [(4, 4), (4, 2), (8, 3), (6, 4)])
def test_static_unmasks_exactly_the_scheduled_count_most_confident_first(block, steps):
    generator = torch.Generator().manual_seed(block * 10 + steps)
    strategy, cfg = get_remasking("static"), RolloutConfig(remasking="static")
    masked = torch.ones(5, block, dtype=torch.bool)
    for round_index, count in enumerate(round_schedule(block, steps)):
        confidence = torch.rand(5, block, generator=generator)
        select = strategy(confidence, masked, round_index, steps, cfg)
        assert not (select & ~masked).any(), "only masked positions may be unmasked"
        assert select.sum(dim=1).tolist() == [count] * 5
        # every selected position is at least as confident as every masked one left behind
        left = masked & ~select
        for row in range(5):
            if left[row].any():
                assert confidence[row][select[row]].min() >= confidence[row][left[row]].max()
        masked &= ~select
    assert not masked.any(), "the schedule finishes the block in `steps` rounds"


def test_dynamic_unmasks_above_threshold_and_at_least_one():
    strategy, cfg = get_remasking("dynamic"), RolloutConfig(remasking="dynamic", threshold=0.9)
    masked = torch.tensor([[True, True, True, True], [True, True, True, False], [True] * 4])
    confidence = torch.tensor(
        [[0.95, 0.2, 0.91, 0.99], [0.3, 0.5, 0.1, 0.99], [0.9, 0.1, 0.2, 0.3]]
    )
    select = strategy(confidence, masked, 0, 4, cfg)
    # row 0: the three above 0.9; row 1: none above among masked -> the single most confident
    # (0.5; the 0.99 is not masked); row 2: 0.9 is not above 0.9 -> the most confident only
    expected = torch.tensor(
        [[True, False, True, True], [False, True, False, False], [True, False, False, False]]
    )
    assert torch.equal(select, expected)


def test_dynamic_finishes_the_block_by_the_last_round():
    strategy, cfg = get_remasking("dynamic"), RolloutConfig(remasking="dynamic", threshold=0.99)
    masked = torch.ones(3, 8, dtype=torch.bool)
    confidence = torch.full((3, 8), 0.1)  # never above the threshold
    counts = []
    for round_index in range(2):  # 8 tokens, 2 rounds: the floor is ceil(left / rounds left)
        select = strategy(confidence, masked, round_index, 2, cfg)
        counts.append(select.sum(dim=1).tolist())
        masked &= ~select
    assert counts == [[4, 4, 4], [4, 4, 4]]
    assert not masked.any()


def test_dynamic_leaves_finished_rows_alone():
    strategy, cfg = get_remasking("dynamic"), RolloutConfig()
    masked = torch.tensor([[False, False], [True, False]])
    select = strategy(torch.tensor([[0.99, 0.99], [0.1, 0.99]]), masked, 0, 2, cfg)
    assert torch.equal(select, torch.tensor([[False, False], [True, False]]))


def test_registry_names_and_unknown_strategy():
    assert {"static", "dynamic"} <= set(available_strategies())
    with pytest.raises(ValueError, match="unknown rollout.remasking='lowest'.*static"):
        get_remasking("lowest")
    with pytest.raises(ValueError, match="already registered"):
        register_remasking("static")(lambda *args: None)
