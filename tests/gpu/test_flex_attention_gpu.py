"""The FlexAttention core on a GPU: compiled forward + backward against the dense path (bf16), and
the peak memory of a student training step at S = 2k / 4k / 9k, flex vs dense.

Skipped without CUDA (CI and the CPU machines have none). Not yet run on a GPU by this project:
the first GPU session should run `pytest tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _packed_columns(prompt: int, response: int, block: int, batch: int, device):
    from megatron_opdlm.models import mask_functions as mf

    cols_p, cols_r = torch.arange(prompt), torch.arange(response)
    rows = []
    for i in range(batch):  # row i left-padded by 13i, its response ending mid-block
        r_valid = cols_r < response - 6 * i - 1 if i else cols_r < response
        rows.append(torch.cat([cols_p >= 13 * i, r_valid, r_valid]))
    valid = torch.stack(rows).to(device)
    return mf.packed_row_columns(prompt, response, block, valid)


def test_compiled_flex_forward_backward_equals_dense_bf16():
    from megatron_opdlm.models import flex_attention as fa
    from megatron_opdlm.models import mask_functions as mf

    columns, _ = _packed_columns(300, 362, 4, 2, "cuda")  # S = 1024 (crosses 8 tiles)
    s = columns.shape[-1]
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [
        torch.randn(2, h, s, 64, generator=g, device="cuda", dtype=torch.bfloat16)
        for h in (8, 2, 2)  # GQA: 8 heads over 2 groups
    ]
    grads = []
    outs = []
    for use_flex in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in leaves)
        if use_flex:
            out = fa.attention(q, k, v, columns)  # compiled on CUDA
        else:
            keep = mf.dense_allowed(columns, s)[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
        out.float().square().mean().backward()
        outs.append(out.detach().float())
        grads.append([t.grad.float() for t in (q, k, v)])
    # bf16 inputs and outputs: one bf16 ulp at |x| ~ 1-4 is 8e-3..3e-2; kernels accumulate in
    # fp32 in different orders
    torch.testing.assert_close(outs[0], outs[1], atol=3e-2, rtol=2e-2)
    for got, want in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=2e-2)


def _step_peak(backend: str, length: int) -> int:
    """Peak CUDA bytes of one student forward + backward on a packed row of `length`."""
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.models.masks import attention_input
    from tests.tiny import tiny_config

    config = tiny_config(
        "model.hidden_size=256", "model.ffn_hidden_size=512", "model.num_attention_heads=8",
        "model.num_query_groups=2", "model.max_position_embeddings=16384",
        "precision.dtype=bf16", f"precision.attention_backend={backend}",
    )  # fmt: skip
    (student,) = build_student(config)
    prompt = 1024 if length > 4096 else length // 4
    response = (length - prompt) // 2 // 4 * 4
    columns, positions = _packed_columns(length - 2 * response, response, 4, 1, "cuda")
    fmt = "columns" if backend == "flex" else "dense"
    mask = attention_input(columns, fmt)
    tokens = torch.randint(2, 100, (1, columns.shape[-1]), device="cuda")
    student.train()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    student(tokens, positions, mask).float().logsumexp(-1).mean().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del student
    torch.cuda.empty_cache()
    return peak


def test_student_step_peak_memory_flex_vs_dense():
    from megatron_opdlm.config import ParallelConfig
    from megatron_opdlm.runtime import distributed

    distributed.initialize(ParallelConfig(), seed=1)
    peaks = {
        (backend, s): _step_peak(backend, s)
        for s in (2048, 4096, 9024)
        for backend in ("flex", "local")
    }
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()})
    # dense keeps [b, h, S, S] scores and probabilities per layer: at 9k, 8 heads, 2 layers that
    # is > 5 GB; flex keeps O(S) per layer
    assert peaks[("flex", 9024)] * 5 < peaks[("local", 9024)]
    # dense grows ~S^2 (x4 from 4k to ~9k at least), flex ~S
    assert peaks[("local", 9024)] > 3 * peaks[("local", 4096)]
    assert peaks[("flex", 9024)] < 4 * peaks[("flex", 4096)]
