"""Each CPU patch is necessary: without it its failure comes back; with all, the scenario runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU patches apply without CUDA")


def _run(skip: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPDLM_CPU_COMPAT_SKIP": skip, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tests.unit.cpu_compat_scenario"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_scenario_runs_with_all_patches():
    result = _run("")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scenario ok" in result.stdout


# a CUDA build of torch without a GPU says "no NVIDIA driver"; a CPU build "not compiled with CUDA"
NO_CUDA = ("Found no NVIDIA driver", "Torch not compiled with CUDA enabled")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ("current_device", NO_CUDA),
        ("cuda_literals", NO_CUDA),
        ("rng", NO_CUDA),
        ("streams", NO_CUDA),
        ("type_names", ("Wrapped parameters must be one of torch.cuda.FloatTensor",)),
    ],
)
def test_each_patch_is_needed(patch, expected):
    result = _run(patch)
    assert result.returncode != 0, f"the scenario passed without the {patch!r} patch"
    assert any(message in result.stderr for message in expected), result.stderr[-2000:]


def test_unknown_patch_name_is_an_error():
    from megatron_opdlm.runtime import cpu_compat

    with pytest.raises(ValueError, match="unknown CPU patch names"):
        cpu_compat.apply(skip=("no_such_patch",))
