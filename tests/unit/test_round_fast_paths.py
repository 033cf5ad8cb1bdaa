"""The cheaper-round fast paths: each is taken when it should be, gives megatron's result within
its stated tolerance, and falls back otherwise.

- `cpu_compat.small_row_linears`: W @ x^T up to WEIGHT_FIRST_ROWS rows, oneDNN's linear above
  (up to SMALL_ROWS) when torch has it (else W @ x^T up to NO_ONEDNN_ROWS, x @ W^T above),
  megatron's own path past SMALL_ROWS or under autograd.
- `slot_cache._rotate`: RoPE from cos/sin computed once per forward, bit-equal to megatron's
  per-layer `_apply_rotary_pos_emb_bshd`.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_opdlm.diffusion.slot_cache import _rotate
from megatron_opdlm.runtime import cpu_compat


class _FakeLinear:
    """A megatron linear's `_forward_impl` that records each fallback call."""

    def __init__(self):
        self.fallbacks = 0

    def _forward_impl(self, input, weight, bias=None, sequence_parallel=False, **kwargs):
        self.fallbacks += 1
        out = torch.matmul(input, weight.t())
        return out if bias is None else out + bias


def _fast_impl(linear):
    impl = cpu_compat._small_row_forward_impl(linear)
    return lambda x, w, b=None: impl(input=x, weight=w, bias=b)


def _spy_onednn(monkeypatch):
    calls = []
    real = cpu_compat._onednn_linear

    def spy(flat, weight):
        calls.append(flat.shape[0])
        return real(flat, weight)

    monkeypatch.setattr(cpu_compat, "_onednn_linear", spy)
    return calls


@pytest.mark.skipif(not cpu_compat.onednn_linear_available(), reason="torch without oneDNN")
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9, 64, 65])
def test_few_row_linear_kernel_by_row_count(rows, monkeypatch):
    torch.manual_seed(0)
    linear = _FakeLinear()
    onednn_calls = _spy_onednn(monkeypatch)
    weight, bias = torch.randn(96, 40), torch.randn(96)
    x = torch.randn(rows, 1, 40)  # [s, b, in], as megatron's layers pass it
    with torch.no_grad():
        out = _fast_impl(linear)(x, weight, bias)
    expected = torch.nn.functional.linear(x, weight, bias)
    # the same sums in another order: fp32 rounding only (|out| ~ 6 here; measured <= 4e-6)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)
    assert out.shape == (rows, 1, 96)
    fast = rows <= cpu_compat.SMALL_ROWS
    assert linear.fallbacks == (0 if fast else 1), "megatron's path exactly past SMALL_ROWS"
    onednn = cpu_compat.WEIGHT_FIRST_ROWS < rows <= cpu_compat.SMALL_ROWS
    assert onednn_calls == ([rows] if onednn else []), "oneDNN only between the two bounds"


def test_few_row_linear_falls_back_without_onednn_or_under_autograd(monkeypatch):
    torch.manual_seed(0)
    linear = _FakeLinear()
    onednn_calls = _spy_onednn(monkeypatch)
    monkeypatch.setattr(cpu_compat, "onednn_linear_available", lambda: False)
    weight, x = torch.randn(32, 16), torch.randn(cpu_compat.NO_ONEDNN_ROWS, 16)
    with torch.no_grad():
        out = _fast_impl(linear)(x, weight)
        more = torch.randn(cpu_compat.NO_ONEDNN_ROWS + 1, 16)
        assert torch.equal(_fast_impl(linear)(more, weight), more @ weight.t()), "megatron's"
    torch.testing.assert_close(out, x @ weight.t(), rtol=0, atol=1e-5)
    assert onednn_calls == [] and linear.fallbacks == 0, "without oneDNN: W @ x^T for 8 rows"
    with torch.enable_grad():
        _fast_impl(linear)(x, weight.requires_grad_())
    assert linear.fallbacks == 1, "under autograd megatron's path is kept (its backward)"
    with torch.no_grad():
        _fast_impl(linear)(x.double(), weight.detach().double())
    assert linear.fallbacks == 2, "fp32 only: other dtypes keep megatron's path"


def test_onednn_refused_when_fp32_matmuls_may_run_in_lower_precision():
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no oneDNN fp32 precision setting")
    saved = matmul.fp32_precision
    cpu_compat.onednn_linear_available.cache_clear()
    try:
        matmul.fp32_precision = "bf16"  # a user's choice: oneDNN would then round to bf16
        assert not cpu_compat.onednn_linear_available()
    finally:
        matmul.fp32_precision = saved
        cpu_compat.onednn_linear_available.cache_clear()


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_dim", [8, 4])  # whole head, partial rotary (a pass-through part)
def test_rope_from_precomputed_cos_sin_is_megatrons_bit_for_bit(interleaved, rot_dim):
    torch.manual_seed(0)
    n, b, heads, head_dim = 4, 3, 2, 8
    t = torch.randn(n, b, heads, head_dim)
    freqs = torch.rand(n, b, 1, rot_dim) * 50  # per-row angles, as SlotCache.index gathers them
    expected = _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved)
    got = _rotate(t, (torch.cos(freqs), torch.sin(freqs)), interleaved)
    assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def tiny_student():
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.runtime import distributed
    from tests.tiny import tiny_config

    config = tiny_config()
    distributed.initialize(config.parallel, seed=1234)
    torch.manual_seed(0)
    chunks = build_student(config)
    yield chunks
    distributed.shutdown()


def test_slot_core_attention_is_megatrons_within_fp32_rounding_and_falls_back(tiny_student):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_opdlm.diffusion.slot_cache import slot_attention

    chunks = tiny_student
    core = next(m for m in chunks[0].modules() if type(m) is DotProductAttention)
    heads, groups = core.num_attention_heads_per_partition, core.num_query_groups_per_partition
    d = core.hidden_size_per_attention_head
    torch.manual_seed(0)
    sq, sk, b = 4, 11, 2
    query, key, value = (torch.randn(sq, b, heads, d), torch.randn(sk, b, groups, d),
                         torch.randn(sk, b, groups, d))  # fmt: skip
    keys = torch.arange(sk)
    mask = (keys[None, :] >= torch.tensor([7, 11])[:, None])[:, None, None, :]  # [b, 1, 1, sk]
    mask = mask.expand(-1, 1, sq, -1)  # row 0 sees 7 keys, row 1 all 11 (as round_mask)
    chunks[0].eval()
    with torch.no_grad():
        expected = core(query, key, value, mask)  # [sq, b, heads * d]
        as_double = [t.double() for t in (query, key, value)]
        expected_double = core(*as_double, mask)
        calls = []
        real_sdpa = torch.nn.functional.scaled_dot_product_attention

        def spy(*args, **kwargs):
            calls.append(1)
            return real_sdpa(*args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            with slot_attention(chunks):
                got = core(query, key, value, mask)
                assert calls == [1], "the fused op is taken for an fp32 bool mask in eval"
                fallback = core(*as_double, mask)
                assert calls == [1], "fp64 (not the rollout's fp32) keeps megatron's core"
        finally:
            torch.nn.functional.scaled_dot_product_attention = real_sdpa
    # the same softmax-weighted sums in another order: fp32 rounding (|out| <= ~3; measured 5e-7)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert got.shape == expected.shape == (sq, b, heads * d)
    assert torch.equal(fallback, expected_double)
    assert "forward" not in vars(core), "megatron's forward restored on exit"
