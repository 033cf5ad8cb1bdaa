"""RolloutBatch.row_slice / concat_batches, and the engine's no-cache fallback on `slots`: lock-step
batches of `slots` prompts, joined, whose row slices are exactly the sampler's own batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_opdlm.diffusion.engine import generate_rollout
from megatron_opdlm.diffusion.sampler import generate
from tests.tiny import tiny_config
from tests.unit.test_engine import EOS, FIELDS, PROMPTS

LAYOUT = ("prompt_tokens", "prompt_valid", *FIELDS, "confidences")


@pytest.fixture(scope="module")
def tiny():
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.runtime import distributed

    config = tiny_config("rollout.temperature=0", "rollout.remasking=static")
    distributed.initialize(config.parallel, seed=1234)
    torch.manual_seed(0)
    chunks = build_student(config)
    with torch.no_grad():  # sharper distributions, as in test_sampler
        chunks[0].output_layer.weight.mul_(30.0)
    model = dataclasses.replace(config.model, eos_token_ids=EOS)
    rollout = dataclasses.replace(config.rollout, use_kv_cache=False)
    yield chunks, model, config.diffusion, rollout
    distributed.shutdown()


def _assert_same(got, expected):
    for name in LAYOUT:
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@pytest.mark.parametrize("slots", [2, 4])
def test_no_cache_fallback_decodes_lock_step_batches_of_slots(tiny, slots):
    chunks, model, diffusion, rollout = tiny
    joined = generate_rollout(chunks, PROMPTS, model, diffusion, rollout, 24, slots=slots,
                              return_confidences=True)  # fmt: skip
    assert joined.prompt_tokens.shape[0] == len(PROMPTS)
    for start in range(0, len(PROMPTS), slots):
        alone = generate(chunks, PROMPTS[start : start + slots], model, diffusion, rollout, 24,
                         return_confidences=True)  # fmt: skip
        # greedy, the same lock-step batch: bit-identical, in the batch's own layout
        _assert_same(joined.row_slice(start, start + slots), alone)
    # the slices really trim: rows 0-3 are narrower than row 4's 9 prompt tokens, and rows 0-1
    # end in their first two blocks (measured: lengths 1 and 6 of 24)
    first = joined.row_slice(0, slots)
    assert first.prompt_length < joined.prompt_length
    if slots == 2:
        assert first.response_length == 8 < joined.response_length


def test_row_slice_of_all_rows_is_the_batch(tiny):
    chunks, model, diffusion, rollout = tiny
    batch = generate(chunks, PROMPTS, model, diffusion, rollout, 24, return_confidences=True)
    _assert_same(batch.row_slice(0, len(PROMPTS)), batch)
