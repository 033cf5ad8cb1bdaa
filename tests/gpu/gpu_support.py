"""Skip rules and small helpers of the GPU suite (tests/gpu); importable without CUDA or TE.

Two tiers, one command each (README "GPU tests"):
- bare CUDA (`make test-gpu`): CUDA torch + megatron-core + our pure-Python dependencies, local
  spec, NCCL. Every test: `requires_cuda`.
- Transformer Engine (`make test-gpu-te`): additionally `requires_te`.
The helpers that need no GPU are exercised by tests/unit/test_gpu_suite_helpers.py.
"""

from __future__ import annotations

import importlib.util
import time
from contextlib import contextmanager

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TE = HAS_CUDA and importlib.util.find_spec("transformer_engine") is not None

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (bare CUDA tier)")
requires_te = pytest.mark.skipif(
    not HAS_TE, reason="needs a CUDA GPU and transformer-engine (TE tier)"
)


def gpu_overrides(*extra: str, impl: str = "local", dtype: str = "bf16") -> list[str]:
    """Config overrides of a GPU test job: layer implementation, dtype, then the extras."""
    if impl not in ("local", "transformer_engine"):
        raise ValueError(f"impl {impl!r} must be 'local' or 'transformer_engine'")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype {dtype!r} must be 'fp32' or 'bf16'")
    return [f"precision.transformer_impl={impl}", f"precision.dtype={dtype}", *extra]


def falls(values: list[float], fraction: float, window: int = 4) -> bool:
    """The mean of the last `window` values is below `fraction` x the mean of the first."""
    if len(values) < 2 * window:
        raise ValueError(
            f"{len(values)} values: need at least {2 * window} for windows of {window}"
        )
    first, last = sum(values[:window]) / window, sum(values[-window:]) / window
    return last < fraction * first


@contextmanager
def measured(label: str, report: dict):
    """Wall time (CUDA-synchronised) and peak CUDA memory of the block, into report[label]."""
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    yield
    if HAS_CUDA:
        torch.cuda.synchronize()
    report[label] = {
        "seconds": time.perf_counter() - start,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if HAS_CUDA else 0.0,
    }
    print(f"\n[gpu] {label}: {report[label]['seconds']:.3f} s, "
          f"peak {report[label]['peak_gib']:.3f} GiB")  # fmt: skip


def mean_kl(p: torch.Tensor, q: torch.Tensor, log_probs: bool = False) -> float:
    """Mean KL(p || q) over the leading dims of [..., V] logits (or log-probs), in float64;
    -inf log-probs (ids that are not tokens) count as probability 0 in both."""
    p, q = p.double(), q.double()
    if not log_probs:
        p, q = p.log_softmax(-1), q.log_softmax(-1)
    finite = torch.isfinite(p) & torch.isfinite(q)
    terms = torch.where(finite, p.exp() * (p - q), torch.zeros_like(p))
    return float(terms.sum(-1).mean())
