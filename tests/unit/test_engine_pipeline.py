"""The pipelined-rounds choice of the rollout engine (no model: the rules and the ideal)."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_opdlm.config import RolloutConfig
from megatron_opdlm.diffusion.engine_pipeline import (
    MIN_IDEAL_GAIN,
    choose_microbatches,
    ideal_gain,
    per_row_cost,
    slot_ranges,
)


def test_pipelining_needs_pp_one_chunk_and_two_slots():
    assert choose_microbatches(0, 1, 1, 32) == (1, "PP=1: whole-batch rounds")
    assert choose_microbatches(4, 1, 1, 32)[0] == 1, "PP=1 never pipelines, even when asked"
    assert choose_microbatches(1, 2, 1, 32)[0] == 1, "1 = off"
    microbatches, why = choose_microbatches(2, 2, 2, 32)
    assert microbatches == 1 and "VPP" in why
    assert choose_microbatches(0, 4, 1, 32) == (4, "auto: 4 micro-batches"), "auto: M = PP"
    assert choose_microbatches(3, 2, 1, 32)[0] == 3
    assert choose_microbatches(8, 2, 1, 5)[0] == 5, "at most one micro-batch per slot"
    assert choose_microbatches(0, 2, 1, 1)[0] == 1


def test_the_ideal_compares_every_stage_against_the_busiest_pipelined_stage():
    # PP=2, t(b) = 1 s per stage: unpipelined 2 s; pipelined the busiest stage's M x t(b/M)
    assert ideal_gain([1.0, 1.0], [1.6, 1.2]) == pytest.approx(1.25)
    assert ideal_gain([1.0, 1.0], [1.6, 1.2]) >= MIN_IDEAL_GAIN  # a 2-micro-batch split pays
    # a split that costs as much as the whole batch per micro-batch (no gain): 2 x 0.95
    assert ideal_gain([1.0, 1.0], [1.9, 1.9]) < MIN_IDEAL_GAIN


def test_slot_ranges_are_contiguous_and_cover_every_slot():
    assert slot_ranges(5, 2) == [range(0, 3), range(3, 5)]
    assert slot_ranges(3, 3) == [range(0, 1), range(1, 2), range(2, 3)]
    ranges = slot_ranges(17, 4)
    assert [s for r in ranges for s in r] == list(range(17))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_a_negative_micro_batch_count_is_refused():
    with pytest.raises(ValueError, match="rollout.pipeline_microbatches=-1"):
        dataclasses.replace(RolloutConfig(), pipeline_microbatches=-1).validate()


def test_calibration_compares_rounds_per_forwarded_row():
    # whole-batch samples from commit rounds (2x the rows) against pipelined ones from plain
    # rounds: the same per-row cost, so no gain is invented from the extra rows
    whole = per_row_cost([0.8, 0.9, 0.7], [64, 72, 56])
    cycle = per_row_cost([0.4, 0.45], [32, 36])
    assert whole == pytest.approx(0.0125) and cycle == pytest.approx(0.0125)
    assert ideal_gain([whole, whole], [cycle, cycle]) == pytest.approx(2.0)  # PP=2, even split
    assert per_row_cost([1.0], [0]) == 1.0  # a round with no rows counts as one row
