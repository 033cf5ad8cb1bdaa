"""The GPU suite's helpers that need no GPU (tests/gpu/gpu_support.py), and its skip reasons."""

from __future__ import annotations

import math

import pytest
import torch

from tests.gpu import gpu_support


def test_gpu_overrides_and_their_bad_input():
    assert gpu_support.gpu_overrides("x=1", impl="transformer_engine", dtype="fp32") == [
        "precision.transformer_impl=transformer_engine", "precision.dtype=fp32", "x=1"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="impl 'te'"):
        gpu_support.gpu_overrides(impl="te")
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        gpu_support.gpu_overrides(dtype="fp8")


def test_falls_compares_window_means():
    assert gpu_support.falls([4, 4, 4, 4, 1, 1, 1, 1], 0.9)
    assert not gpu_support.falls([4, 4, 4, 4, 3.7, 3.7, 3.7, 3.7], 0.9)  # 7.5 % lower only
    with pytest.raises(ValueError, match="need at least 8"):
        gpu_support.falls([1.0] * 7, 0.9)


def test_mean_kl_of_logits_and_of_log_probs():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    assert gpu_support.mean_kl(logits, logits) == pytest.approx(0.0, abs=1e-15)
    other = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
    p = logits[0].double().softmax(-1)
    want = float((p * (p.log() - math.log(1 / 3))).sum()) / 2  # the second row contributes 0
    assert gpu_support.mean_kl(logits, other) == pytest.approx(want, rel=1e-12)
    # -inf log-probs (ids that are not tokens) in both count as probability 0
    logp = torch.tensor([[math.log(0.5), math.log(0.5), -math.inf]])
    assert gpu_support.mean_kl(logp, logp, log_probs=True) == 0.0


def test_measured_reports_time_and_memory(capsys):
    report = {}
    with gpu_support.measured("a block", report):
        pass
    assert report["a block"]["seconds"] >= 0 and "peak_gib" in report["a block"]
    assert "[gpu] a block:" in capsys.readouterr().out


def test_without_cuda_every_gpu_test_is_skipped_with_its_reason():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU tiers run instead")
    assert gpu_support.requires_cuda.kwargs["reason"] == "needs a CUDA GPU (bare CUDA tier)"
    assert "transformer-engine" in gpu_support.requires_te.kwargs["reason"]
    assert gpu_support.requires_cuda.args == (True,) and gpu_support.requires_te.args == (True,)
