"""Learning-rate schedule and rollout-length curriculum."""

from __future__ import annotations

import math

import pytest

from megatron_opdlm.config import CurriculumConfig, OptimConfig
from megatron_opdlm.training.schedules import learning_rate, rollout_length_cap


def test_warmup_then_cosine_to_the_floor():
    optim = OptimConfig(lr=1e-5, min_lr=1e-6, warmup_steps=5, decay="cosine")
    total = 25
    assert learning_rate(0, optim, total) == pytest.approx(2e-6)  # (0 + 1) / 5 of the peak
    assert learning_rate(4, optim, total) == pytest.approx(1e-5)
    assert learning_rate(5, optim, total) == pytest.approx(1e-5)  # decay starts at the peak
    mid = 5 + 10  # half-way through the 20 decay steps: cos(pi / 2) = 0
    assert learning_rate(mid, optim, total) == pytest.approx(5.5e-6)
    assert learning_rate(total, optim, total) == pytest.approx(1e-6)
    assert learning_rate(total + 100, optim, total) == pytest.approx(1e-6)  # floor holds
    values = [learning_rate(s, optim, total) for s in range(5, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant_decay():
    linear = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="linear")
    assert learning_rate(3, linear, 10) == pytest.approx(0.7)
    constant = OptimConfig(lr=2.0, min_lr=0.5, warmup_steps=2, decay="constant")
    assert learning_rate(1, constant, 10) == pytest.approx(2.0)
    assert learning_rate(9, constant, 10) == pytest.approx(2.0)


def test_linear_curriculum_is_the_paper_formula_in_whole_blocks():
    cur = CurriculumConfig(schedule="linear", length_min=100, length_max=4000, warmup_steps=100)
    for step in (0, 1, 7, 33, 50, 99, 100, 250):
        paper = min(4000, 100 + math.floor(step / 100 * (4000 - 100)))
        cap = rollout_length_cap(step, cur, default_cap=64, block_size=4)
        assert cap == paper // 4 * 4, step
        assert cap % 4 == 0
    assert rollout_length_cap(0, cur, 64, 4) == 100
    assert rollout_length_cap(100, cur, 64, 4) == 4000


def test_cosine_curriculum_and_none():
    cur = CurriculumConfig(schedule="cosine", length_min=8, length_max=64, warmup_steps=10)
    caps = [rollout_length_cap(s, cur, default_cap=0, block_size=8) for s in range(13)]
    assert caps[0] == 8 and caps[10:] == [64, 64, 64]
    assert all(c % 8 == 0 for c in caps)
    assert all(a <= b for a, b in zip(caps, caps[1:]))
    # slow start: the cosine ramp lags the linear one early on
    linear = CurriculumConfig(schedule="linear", length_min=8, length_max=64, warmup_steps=10)
    assert caps[3] <= rollout_length_cap(3, linear, 0, 8)
    off = CurriculumConfig(schedule="none")
    assert rollout_length_cap(1000, off, default_cap=48, block_size=4) == 48
