"""Learning-rate schedule and rollout-length curriculum: pure functions of the step.

Both are functions of a step counter stored in the checkpoint, so a resumed run continues the
schedules exactly (there is no scheduler object whose state could drift).
"""

from __future__ import annotations

import math

from megatron_opdlm.config import CurriculumConfig, OptimConfig


def learning_rate(step: int, optim: OptimConfig, total_steps: int) -> float:
    """LR for optimizer step `step` (0-based): linear warm-up to optim.lr, then decay to min_lr.

    Warm-up: lr * (step + 1) / warmup_steps, so the first step already moves the weights.
    Cosine / linear decay run from the end of warm-up to `total_steps`, then stay at the floor.
    """
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay == "constant":
        return optim.lr
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    if optim.decay == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return optim.min_lr + (optim.lr - optim.min_lr) * factor


def rollout_length_cap(
    rollout_step: int, curriculum: CurriculumConfig, default_cap: int, block_size: int
) -> int:
    """Response-length cap for rollout step `rollout_step`, a multiple of `block_size`.

    linear (the paper): L_s = min(L_max, L_min + floor(s / S_warm * (L_max - L_min)));
    cosine (the reference code's "cos" ramp): L_min + (L_max - L_min) * (1 - cos(pi/2 * p)),
    p = min(1, s / S_warm). Both are rounded down to a block multiple (L_min and L_max are
    block multiples, checked by the config), so a response is always whole blocks.
    """
    if curriculum.schedule == "none":
        return default_cap
    low, high = curriculum.length_min, curriculum.length_max
    warm = max(1, curriculum.warmup_steps)
    if curriculum.schedule == "linear":
        cap = min(high, low + math.floor(rollout_step / warm * (high - low)))
    else:
        progress = min(1.0, rollout_step / warm)
        cap = low + (high - low) * (1.0 - math.cos(math.pi / 2 * progress))
    cap = math.floor(cap + 1e-9) // block_size * block_size  # 1e-9: cos(pi/2) is not 0 in fp
    return max(low, min(high, cap))
