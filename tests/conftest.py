"""Shared fixtures: tiny configs, single-process Megatron state, deterministic threads."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", os.path.join(os.getcwd(), ".pytest_cache", "inductor")
)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def single_process():
    """Megatron parallel state for one process (TP=PP=1), torn down afterwards."""
    from megatron_opdlm.config import ParallelConfig
    from megatron_opdlm.runtime import distributed

    distributed.initialize(ParallelConfig(), seed=1234)
    yield
    distributed.shutdown()
