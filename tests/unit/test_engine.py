"""The rollout engine (per-sequence progress, continuous batching) on a tiny random student:
equal to the lock-step sampler at S = N, and independent of the slot count and prompt order."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_opdlm.diffusion import engine as engine_module
from megatron_opdlm.diffusion.engine import RolloutAborted, generate_rollout
from megatron_opdlm.diffusion.engine_rows import sequence_keys, sequence_uniform
from megatron_opdlm.diffusion.sampler import generate
from tests.tiny import tiny_student

# ragged prompts, a repeated one; EOS ids that these rows produce mid-response (rows end at
# different blocks: measured on this model)
PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [12, 13],
    [20, 21, 22, 23, 24],
    [30, 31, 32],
    [40] * 9,
    [12, 13],
]
EOS = [11, 26]
FIELDS = ("response_tokens", "response_valid", "step_map", "decoded_step_map", "num_forwards")
SAMPLED = dict(temperature=1.0, top_k=20, top_p=0.9, remasking="dynamic", threshold=0.7)


@pytest.fixture(scope="module")
def tiny():
    with tiny_student("rollout.temperature=0", "rollout.remasking=static") as student:
        yield student


def _configs(tiny, diffusion=None, **rollout):
    config, chunks = tiny
    model = dataclasses.replace(config.model, eos_token_ids=EOS)
    return (
        chunks,
        model,
        dataclasses.replace(config.diffusion, **(diffusion or {})),
        dataclasses.replace(config.rollout, **rollout),
    )


def _engine(tiny, prompts=PROMPTS, slots=0, seed=5, diffusion=None, **rollout):
    chunks, model, diffusion_cfg, rollout_cfg = _configs(tiny, diffusion, **rollout)
    rounds, stats = [], {}
    batch = generate_rollout(
        chunks, prompts, model, diffusion_cfg, rollout_cfg, 24, slots=slots,
        generator=torch.Generator().manual_seed(seed), return_confidences=True,
        round_callback=lambda *args: rounds.append(args), stats=stats,
    )  # fmt: skip
    return batch, rounds, stats


def _rows(batch, row):
    """One sequence's results, cut to its own decoded blocks."""
    width = int((batch.decoded_step_map[row] >= 0).sum())
    return {
        "tokens": batch.response_tokens[row, :width].tolist(),
        "step_map": batch.decoded_step_map[row, :width].tolist(),
        "length": int(batch.response_valid[row].sum()),
        "forwards": int(batch.num_forwards[row]),
    }


@pytest.mark.parametrize("token_shift", [False, True])
@pytest.mark.parametrize("remasking", ["static", "dynamic"])
def test_engine_with_one_slot_per_prompt_equals_the_lock_step_sampler(tiny, token_shift, remasking):
    shift = {"token_shift": token_shift}
    chunks, model, diffusion_cfg, rollout_cfg = _configs(
        tiny, shift, remasking=remasking, threshold=0.7
    )
    sampler_rounds = []
    expected = generate(
        chunks, PROMPTS, model, diffusion_cfg, rollout_cfg, 24, return_confidences=True,
        round_callback=lambda *args: sampler_rounds.append(args),
    )  # fmt: skip
    got, rounds, stats = _engine(tiny, diffusion=shift, remasking=remasking, threshold=0.7)
    lengths = expected.response_lengths()
    assert int(lengths.min()) < expected.response_length, "ragged: EOS ends some rows early"
    for field in FIELDS:
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    # each (sequence, block, round)'s logits at the masked positions
    reference = {}
    for block, round_index, logits, _, masked, _ in sampler_rounds:
        for row in masked.any(dim=1).nonzero().flatten().tolist():
            reference[(row, block, round_index)] = logits[row][masked[row]]
    seen = 0
    for sequences, blocks, rounds_, logits, _, masked, _ in rounds:
        for i, row in enumerate(sequences.tolist()):
            key = (row, int(blocks[i]), int(rounds_[i]))
            # fp32: each row attends over its own key width (the sampler's left padding and the
            # batch's longest row change the summation order); measured <= 2e-6
            torch.testing.assert_close(logits[i][masked[i]], reference[key], rtol=0, atol=1e-5)
            seen += 1
    assert seen == len(reference)
    assert stats["slots"] == len(PROMPTS) and stats["prefills"] == 1


def test_rows_progress_through_their_own_blocks(tiny):
    _, rounds, stats = _engine(tiny, remasking="dynamic", threshold=0.7)
    mixed = [r for r in rounds if len(set(r[1].tolist())) > 1 or len(set(r[2].tolist())) > 1]
    assert mixed, "some forward served rows at different blocks or rounds"
    sampler_rounds = sum(1 for _ in rounds)
    assert stats["rounds"] == sampler_rounds


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "seeded"])
def test_results_do_not_depend_on_slots_or_prompt_order(tiny, sampling, monkeypatch):
    cache_slots = []
    original_free = engine_module.SlotCache.free

    def free(self):
        cache_slots.append({kv[0].shape[1] for kv in self.key_value_memory_dict.values()})
        original_free(self)

    monkeypatch.setattr(engine_module.SlotCache, "free", free)
    reference, _, _ = _engine(tiny, **sampling)
    n = len(PROMPTS)
    expected = [_rows(reference, row) for row in range(n)]
    for slots in (3, 1):
        batch, _, stats = _engine(tiny, slots=slots, **sampling)
        assert [_rows(batch, row) for row in range(n)] == expected, f"slots={slots}"
        assert stats["prefills"] >= -(-n // slots), "freed slots were refilled"
        assert cache_slots[-1] == {slots}, "the cache holds S slots, not N"
    order = [4, 1, 5, 0, 3, 2]
    permuted, _, _ = _engine(tiny, prompts=[PROMPTS[i] for i in order], slots=2, **sampling)
    for row, source in enumerate(order):
        got = _rows(permuted, row)
        # the two equal prompts (rows 1 and 5) may swap: their occurrence order changed
        assert got == expected[source] or PROMPTS[source] == PROMPTS[1]
    if sampling:
        other, _, _ = _engine(tiny, seed=6, **sampling)
        assert not torch.equal(other.response_tokens, reference.response_tokens)
        assert _rows(reference, 1) != _rows(reference, 5), "equal prompts, own streams"


def test_sequence_streams_are_uniform_and_keyed():
    keys = torch.tensor(sequence_keys([[1, 2], [1, 2], [3]]))
    assert len(set(keys.tolist())) == 3
    draws = sequence_uniform(7, keys.repeat(2000), torch.arange(6000), torch.arange(6000) % 4, 4)
    assert float(draws.min()) >= 0 and float(draws.max()) < 1
    # 24,000 draws: mean within 4 sigma (sigma = 0.29 / sqrt(24000) = 0.0019) of 1/2
    assert abs(float(draws.mean()) - 0.5) < 0.008
    again = sequence_uniform(7, keys, torch.zeros(3, dtype=torch.long), torch.zeros(3), 4)
    assert torch.equal(again, sequence_uniform(7, keys, torch.zeros(3), torch.zeros(3), 4))


def test_hooks_stop_rows_and_abort(tiny):
    chunks, model, diffusion_cfg, rollout_cfg = _configs(tiny)
    asked = []

    def stop_after_two_blocks(response, lengths):
        asked.append(response.shape)
        return lengths >= 8

    batch = generate_rollout(
        chunks, PROMPTS, model, diffusion_cfg, rollout_cfg, 24, slots=2,
        stop_rows=stop_after_two_blocks,
    )  # fmt: skip
    full, _, _ = _engine(tiny)
    assert batch.response_length <= 8 and asked
    for row in range(len(PROMPTS)):
        length = int(batch.response_valid[row].sum())
        assert length == min(8, int(full.response_valid[row].sum()))
        assert torch.equal(batch.response_tokens[row, :length], full.response_tokens[row, :length])
    blocks = []

    def abort_at_block_two(block):
        blocks.append(block)
        return block == 2

    with pytest.raises(RolloutAborted, match="before block 2"):
        generate_rollout(
            chunks, PROMPTS, model, diffusion_cfg, rollout_cfg, 24, slots=3,
            should_abort=abort_at_block_two,
        )  # fmt: skip
    assert blocks == [0, 1, 2]


def test_bad_slot_count_is_refused(tiny):
    chunks, model, diffusion_cfg, rollout_cfg = _configs(tiny)
    with pytest.raises(ValueError, match="slots=-1"):
        generate_rollout(chunks, PROMPTS, model, diffusion_cfg, rollout_cfg, 8, slots=-1)
    with pytest.raises(ValueError, match="rollout.slots=-1"):
        dataclasses.replace(rollout_cfg, slots=-1).validate()


def test_lean_layers_cover_the_student_and_are_restored(tiny):
    from megatron_opdlm.diffusion.lean_layer import lean_layers, lean_supported

    _, chunks = tiny
    layers = list(chunks[0].decoder.layers)
    assert layers and all(lean_supported(layer) for layer in layers)
    with lean_layers(chunks):
        assert all("forward" in vars(layer) for layer in layers)
    assert not any("forward" in vars(layer) for layer in layers)


@pytest.mark.parametrize("token_shift,fused_swiglu", [(False, False), (True, False), (True, True)])
def test_lean_layers_give_megatron_layers_bits(tiny, monkeypatch, token_shift, fused_swiglu):
    """The engine's lean layer forward (diffusion.lean_layer) against megatron's own layers on
    the same rollout (sampled, ragged, EOS mid-block, S < N so rows of different blocks share a
    forward): every round's logits and all results bit-equal (same operations, same order).
    fused_swiglu: megatron's bias_activation_fusion (the builder's GPU setting) on both sides."""
    import contextlib

    from megatron_opdlm.diffusion import lean_layer

    _, chunks = tiny
    if fused_swiglu:  # the layers share the model's TransformerConfig
        monkeypatch.setattr(chunks[0].config, "bias_activation_fusion", True)
        assert all(lean_layer.lean_supported(layer) for layer in chunks[0].decoder.layers)
    calls = []
    attention = lean_layer._attention
    monkeypatch.setattr(lean_layer, "_attention", lambda *a: calls.append(1) or attention(*a))
    run = dict(slots=4, diffusion={"token_shift": token_shift}, **SAMPLED)
    lean, lean_rounds, _ = _engine(tiny, **run)
    assert len(calls) > 0  # the lean forward did run
    monkeypatch.setattr(engine_module, "lean_layers", lambda chunks: contextlib.nullcontext())
    calls.clear()
    plain, plain_rounds, _ = _engine(tiny, **run)
    assert not calls
    for field in FIELDS:
        assert torch.equal(getattr(lean, field), getattr(plain, field)), field
    assert len(lean_rounds) == len(plain_rounds)
    for ours, theirs in zip(lean_rounds, plain_rounds, strict=True):
        assert torch.equal(ours[3], theirs[3])  # the round's logits [a, B, V]
