"""Block-diffusion sampler on a tiny random student (one process, fp32, local spec)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_opdlm.diffusion import sampler as sampler_module
from megatron_opdlm.diffusion.block_forward import CachedBlockForward
from megatron_opdlm.diffusion.sampler import generate
from megatron_opdlm.models.masks import causal_mask
from megatron_opdlm.models.vocab import mask_invalid_logits
from tests.tiny import tiny_student

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def tiny():
    with tiny_student("rollout.temperature=0", "rollout.remasking=static") as student:
        yield student


def _run(
    tiny, prompts=PROMPTS, max_new_tokens=16, generator=None, diffusion=None, model=None, **rollout
):
    config, chunks = tiny
    rollout_cfg = dataclasses.replace(config.rollout, **rollout)
    diffusion_cfg = dataclasses.replace(config.diffusion, **(diffusion or {}))
    rounds = []
    batch = generate(
        chunks,
        prompts,
        model or config.model,
        diffusion_cfg,
        rollout_cfg,
        max_new_tokens,
        generator=generator,
        return_confidences=True,
        round_callback=lambda *args: rounds.append(args),
    )
    return batch, rounds


@pytest.mark.parametrize("token_shift", [False, True])
@pytest.mark.parametrize("remasking", ["static", "dynamic"])
def test_cache_matches_no_cache(tiny, token_shift, remasking):
    shift = {"token_shift": token_shift}
    cached, cached_rounds = _run(tiny, diffusion=shift, remasking=remasking, threshold=0.7)
    full, full_rounds = _run(
        tiny, diffusion=shift, remasking=remasking, threshold=0.7, use_kv_cache=False
    )
    assert torch.equal(cached.response_tokens, full.response_tokens)
    assert torch.equal(cached.step_map, full.step_map)
    assert torch.equal(cached.num_forwards, full.num_forwards)
    assert len(cached_rounds) == len(full_rounds)
    for (_, _, logits_c, _, masked, _), (_, _, logits_f, *_) in zip(cached_rounds, full_rounds):
        # fp32: the cached path attends over the same keys in another order of operations;
        # measured max difference 1.5e-7 (a causal mask inside the block gives 3.6e-2).
        torch.testing.assert_close(logits_c[masked], logits_f[masked], rtol=0, atol=1e-5)


def _greedy_ar(chunks, model_cfg, prompt, steps):
    """Reference AR decoding: a full causal forward per token, argmax of the last position."""
    tokens = list(prompt)
    for _ in range(steps):
        ids = torch.tensor([tokens])
        mask = causal_mask(torch.ones_like(ids, dtype=torch.bool))
        logits = chunks[0](ids, torch.arange(ids.shape[1])[None], mask)[:, -1]  # [1, V]
        tokens.append(int(mask_invalid_logits(logits, model_cfg).argmax(-1)))
        if tokens[-1] in model_cfg.eos_token_ids:
            break
    return tokens[len(prompt) :]


def test_block_size_one_with_token_shift_is_ar_greedy_decoding(tiny):
    config, chunks = tiny
    batch, _ = _run(
        tiny, diffusion={"block_size": 1, "token_shift": True}, steps_per_block=1, max_new_tokens=12
    )
    with torch.no_grad():
        for row, prompt in enumerate(PROMPTS):
            expected = _greedy_ar(chunks, config.model, prompt, 12)
            length = int(batch.response_valid[row].sum())
            assert batch.response_tokens[row, :length].tolist() == expected
            assert int(batch.num_forwards[row]) == length  # one forward per token, like AR


def test_ragged_batch_decodes_like_one_prompt_at_a_time(tiny):
    batch, _ = _run(tiny, diffusion={"token_shift": True})
    for row, prompt in enumerate(PROMPTS):
        alone, _ = _run(tiny, prompts=[prompt], diffusion={"token_shift": True})
        width = alone.response_length
        assert torch.equal(batch.response_tokens[row, :width], alone.response_tokens[0])
        assert torch.equal(batch.step_map[row, :width], alone.step_map[0])


def test_seeded_sampling_is_reproducible(tiny):
    sampling = dict(temperature=1.0, top_k=20, top_p=0.9, remasking="dynamic")
    g1, g2, g3 = (torch.Generator().manual_seed(s) for s in (7, 7, 8))
    first, _ = _run(tiny, generator=g1, **sampling)
    second, _ = _run(tiny, generator=g2, **sampling)
    other, _ = _run(tiny, generator=g3, **sampling)
    assert torch.equal(first.response_tokens, second.response_tokens)
    assert torch.equal(first.step_map, second.step_map)
    assert not torch.equal(first.response_tokens, other.response_tokens)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_sampled_tokens_respect_top_k(tiny):
    batch, rounds = _run(tiny, generator=torch.Generator().manual_seed(3), temperature=1.0, top_k=3)
    for block, _, logits, _, _, select in rounds:
        top3 = logits.topk(3, dim=-1).indices  # [b, B, 3]
        columns = slice(block * 4, block * 4 + 4)
        chosen = batch.response_tokens[:, columns]
        in_top = (top3 == chosen[..., None]).any(-1)
        assert in_top[select].all()


def test_static_unmasks_the_scheduled_count_each_round(tiny):
    batch, rounds = _run(tiny, steps_per_block=2)
    assert len(rounds) == 2 * (batch.response_length // 4)
    for _, _, _, _, masked, select in rounds:
        active = masked.any(dim=1)
        assert select[active].sum(dim=1).eq(2).all()
        assert not select[~active].any()


def test_dynamic_respects_threshold_and_unmasks_at_least_one(tiny):
    threshold = 0.7
    batch, rounds = _run(tiny, remasking="dynamic", threshold=threshold)
    several = 0
    for block, _, logits, _, masked, select in rounds:
        confidence = logits.softmax(-1).max(-1).values  # greedy: prob of the argmax
        recorded = batch.confidences[:, block * 4 : block * 4 + 4]
        valid = batch.response_valid[:, block * 4 : block * 4 + 4]
        torch.testing.assert_close(recorded[select & valid], confidence[select & valid])
        active = masked.any(dim=1)
        assert select[active].sum(dim=1).ge(1).all()
        assert select[masked & (confidence > threshold)].all(), "all above threshold unmask"
        extra = select & (confidence <= threshold)
        assert extra.sum(dim=1).le(1).all(), "below threshold only the one forced pick"
        several += int((select.sum(dim=1) > 1).sum())
    assert several > 0, "the threshold was exercised (some round unmasked several tokens)"
    fast, _ = _run(tiny, remasking="dynamic", threshold=1e-9)
    assert torch.equal(
        fast.num_forwards, fast.response_length // 4 * torch.ones(3, dtype=torch.long)
    )
    assert (fast.step_map[fast.response_valid] == 0).all()


def test_step_map_is_the_unmasking_order(tiny):
    config, _ = tiny
    mask_id = config.model.student_mask_token_id
    batch, rounds = _run(tiny, remasking="dynamic", threshold=0.7)
    decoded = batch.decoded_step_map
    for block, round_index, _, x, masked, select in rounds:
        columns = slice(block * 4, block * 4 + 4)
        steps = decoded[:, columns]
        active = masked.any(dim=1)
        # before round r exactly the positions unmasked at round >= r hold the mask token
        assert torch.equal(masked[active], steps[active] >= round_index)
        assert torch.equal((x == mask_id)[active], steps[active] >= round_index)
        assert torch.equal(select[active], steps[active] == round_index)
    assert torch.equal(batch.step_map[batch.response_valid], decoded[batch.response_valid])
    assert (batch.step_map[~batch.response_valid] == -1).all()


def test_eos_ends_the_sequence_after_its_block_and_the_cap_holds(tiny):
    config, _ = tiny
    never = dataclasses.replace(config.model, eos_token_ids=[119])  # a token this model avoids
    plain, _ = _run(tiny, max_new_tokens=24, model=never)
    assert not (plain.response_tokens == 119).any()
    assert plain.response_length == 24 and plain.response_valid.all(), "the cap ends them all"
    # make a token the first row produces at column 9 (block 2) its end-of-sequence token
    eos = int(plain.response_tokens[0, 9])
    first = [
        int((row == eos).nonzero()[0]) if (row == eos).any() else None
        for row in plain.response_tokens
    ]
    model = dataclasses.replace(config.model, eos_token_ids=[eos])
    stopped, _ = _run(tiny, max_new_tokens=24, model=model)
    for row, position in enumerate(first):
        length = 24 if position is None else position + 1
        assert int(stopped.response_valid[row].sum()) == length
        assert stopped.response_valid[row, :length].all()
        end_of_block = stopped.response_length if position is None else (position // 4 + 1) * 4
        # the EOS block is finished (same tokens as without EOS); later blocks are never decoded
        assert torch.equal(
            stopped.response_tokens[row, :end_of_block], plain.response_tokens[row, :end_of_block]
        )
        assert (stopped.response_tokens[row, end_of_block:] == config.model.pad_token_id).all()
        assert (stopped.decoded_step_map[row, end_of_block:] == -1).all()
        assert int(stopped.num_forwards[row]) == end_of_block  # static: 1 token per round
    assert stopped.response_length == max(24 if p is None else (p // 4 + 1) * 4 for p in first)


def test_cache_freed_and_training_mode_restored(tiny, monkeypatch):
    _, chunks = tiny
    freed = []
    original_free = CachedBlockForward.free

    def free(self):
        had = len(self.cache.context.key_value_memory_dict)
        original_free(self)
        freed.append((had, len(self.cache.context.key_value_memory_dict)))

    monkeypatch.setattr(CachedBlockForward, "free", free)
    chunks[0].train()
    try:
        _run(tiny, max_new_tokens=4)
        assert chunks[0].training and all(m.training for m in chunks[0].modules())
    finally:
        chunks[0].eval()
    assert freed == [(2, 0)], "one cache, two layers of K/V, emptied before returning"


@pytest.mark.parametrize(
    "prompts,max_new_tokens,override,match",
    [
        ([], 8, {}, "prompts is empty"),
        ([[5, 6], []], 8, {}, "prompt 1 is empty"),
        ([[5] * 2045], 8, {}, "exceeds model.max_position_embeddings=2048"),
        ([[5, 6]], 6, {}, "max_new_tokens=6 is not a positive multiple of diffusion.block_size=4"),
        ([[5, 6]], 8, {"remasking": "best"}, "unknown rollout.remasking='best'"),
        ([[5, 6]], 8, {"steps_per_block": 5}, "steps_per_block=5"),
        ([[5, 500]], 8, {}, "token id 500 outside"),
        ([[5, 120]], 8, {}, "token id 120 outside"),
        ([[5, 6]], 8, {"top_p": 0.0}, "rollout.top_p=0.0"),
    ],
)
def test_bad_input_is_refused_before_any_work(
    tiny, monkeypatch, prompts, max_new_tokens, override, match
):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built or run before the input was checked")

    monkeypatch.setattr(sampler_module, "ModelRunner", no_model)
    with pytest.raises(ValueError, match=match):
        _run(tiny, prompts=prompts, max_new_tokens=max_new_tokens, **override)


class _NonLocalCore(torch.nn.Module):
    """Stands in for Transformer Engine's core attention (not megatron's local class): records
    the mask type megatron-core hands it, then runs the local attention."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, *args, attn_mask_type=None, **kwargs):
        self.seen.append(attn_mask_type)
        return self.inner(*args, attn_mask_type=attn_mask_type, **kwargs)


def test_cached_rounds_keep_the_explicit_mask_type_as_on_te_2_2(tiny, monkeypatch):
    from megatron.core.transformer import attention as mcore_attention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_opdlm.diffusion import kv_cache

    _, chunks = tiny
    attention = chunks[0].decoder.layers[0].self_attention
    local_core = attention.core_attention
    # megatron-core keeps the layer's mask type at offset > 0 only in training mode on TE >= 2.2
    monkeypatch.setattr(mcore_attention, "is_te_min_version", lambda *args, **kwargs: True)
    try:
        for explicit in (True, False):
            attention.core_attention = _NonLocalCore(local_core)
            if not explicit:  # what a cached rollout would see without ExplicitMasks
                monkeypatch.setattr(kv_cache.ExplicitMasks, "__enter__", lambda self: None)
                monkeypatch.setattr(kv_cache.ExplicitMasks, "__exit__", lambda self, *exc: None)
            _run(tiny, use_kv_cache=True)
            seen = set(attention.core_attention.seen)
            if explicit:
                assert seen == {AttnMaskType.arbitrary}, seen
            else:
                assert AttnMaskType.no_mask in seen, seen
    finally:
        attention.core_attention = local_core


def test_small_row_linears_take_the_weight_first_product_for_few_rows_only(tiny, monkeypatch):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_opdlm.runtime import cpu_compat

    _, chunks = tiny
    calls = []
    for cls in (ColumnParallelLinear, RowParallelLinear):
        original = cls._forward_impl

        def counting(self, *args, _original=original, **kwargs):
            calls.append(type(self).__name__)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "_forward_impl", counting)

    def logits(length):
        ids = torch.arange(5, 5 + length)[None]  # [1, s]
        mask = causal_mask(torch.ones_like(ids, dtype=torch.bool))
        return chunks[0](ids, torch.arange(length)[None], mask)  # [1, s, V]

    chunks[0].eval()
    with torch.no_grad():
        few_ref, many_ref = logits(cpu_compat.SMALL_ROWS), logits(cpu_compat.SMALL_ROWS + 1)
        calls.clear()
        with cpu_compat.small_row_linears(chunks):
            few = logits(cpu_compat.SMALL_ROWS)
            assert calls == [], "few rows: every linear takes W @ x^T"
            many = logits(cpu_compat.SMALL_ROWS + 1)
            assert len(calls) == 2 * 4 + 1, "more rows: megatron's path (4 linears/layer + head)"
            calls.clear()
            with torch.enable_grad():
                logits(2)
            assert calls, "under autograd megatron's path is kept (its backward is needed)"
    # same math summed in another order: fp32 rounding only (measured ~1e-7 on this model)
    torch.testing.assert_close(few, few_ref, rtol=0, atol=1e-5)
    assert torch.equal(many, many_ref)
    assert not any("_forward_impl" in vars(m) for m in chunks[0].modules()), "restored on exit"
