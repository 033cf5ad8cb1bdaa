"""Remasking strategies: which still-masked positions of a block a denoising round unmasks.

A strategy is a function registered by name (`rollout.remasking`):

    select = strategy(confidence, masked, round_index, steps_per_block, rollout_cfg)

`confidence` [b, B] float is the probability of the token sampled at each position, `masked`
[b, B] bool the positions still holding the mask token. The result [b, B] bool is a subset of
`masked`. Every strategy must finish a block within `steps_per_block` rounds (the last round
unmasks whatever is left), so a block never costs more forwards than the cap.

- static: the k most confident per round, k from the schedule `round_schedule(B, steps)`
  (B/steps each round when steps divides B, else ceil(left / rounds left), larger counts first).
  Ties go to the lower position (stable sort).
- dynamic: every masked position whose confidence is above `rollout.threshold`, and at least
  one; and at least ceil(left / rounds left) so the block still ends by the last round (with the
  paper's 4 steps for block 4 that floor is simply "at least one").
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_opdlm.config import RolloutConfig

RemaskingStrategy = Callable[[torch.Tensor, torch.Tensor, int, int, RolloutConfig], torch.Tensor]
_REGISTRY: dict[str, RemaskingStrategy] = {}


def register_remasking(name: str) -> Callable[[RemaskingStrategy], RemaskingStrategy]:
    """Decorator adding a strategy under `name` (usable as rollout.remasking=name)."""

    def add(fn: RemaskingStrategy) -> RemaskingStrategy:
        if name in _REGISTRY:
            raise ValueError(f"remasking strategy {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def available_strategies() -> list[str]:
    return sorted(_REGISTRY)


def get_remasking(name: str) -> RemaskingStrategy:
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown rollout.remasking={name!r}; choose one of {available_strategies()} "
            "(or register one with megatron_opdlm.diffusion.remasking.register_remasking)"
        )
    return _REGISTRY[name]


def round_schedule(block_size: int, steps_per_block: int) -> list[int]:
    """Tokens unmasked in each round of the static schedule; sums to block_size, each >= 1."""
    if not 1 <= steps_per_block <= block_size:
        raise ValueError(
            f"rollout.steps_per_block={steps_per_block} must be in [1, block size {block_size}]: "
            "each round must unmask at least one token"
        )
    counts, left = [], block_size
    for rounds_left in range(steps_per_block, 0, -1):  # front-loaded: ceil(left / rounds left)
        counts.append(-(-left // rounds_left))
        left -= counts[-1]
    return counts


def _most_confident(
    confidence: torch.Tensor, masked: torch.Tensor, count: torch.Tensor
) -> torch.Tensor:
    """[b, B] bool: the `count[i]` most confident masked positions of each row i."""
    scores = confidence.masked_fill(~masked, float("-inf"))  # [b, B]
    order = scores.argsort(dim=1, descending=True, stable=True)  # [b, B]
    rank = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank.scatter_(1, order, positions)  # rank[i, j] = place of position j in row i's order
    return masked & (rank < count[:, None])


def _rounds_floor(masked: torch.Tensor, round_index: int, steps_per_block: int) -> torch.Tensor:
    """[b] the fewest tokens a row may unmask now and still finish by the last round."""
    left = masked.sum(dim=1)  # [b]
    rounds_left = max(1, steps_per_block - round_index)
    return torch.div(left + rounds_left - 1, rounds_left, rounding_mode="floor")


@register_remasking("static")
def static_remasking(confidence, masked, round_index, steps_per_block, rollout_cfg):
    block_size = masked.shape[1]
    schedule = round_schedule(block_size, steps_per_block)
    scheduled = schedule[min(round_index, steps_per_block - 1)]
    # the floor only matters for a row that started the block with fewer masks than B
    count = torch.maximum(
        torch.full_like(masked[:, 0], scheduled, dtype=torch.long),
        _rounds_floor(masked, round_index, steps_per_block),
    )
    return _most_confident(confidence, masked, count)


@register_remasking("dynamic")
def dynamic_remasking(confidence, masked, round_index, steps_per_block, rollout_cfg):
    above = masked & (confidence > rollout_cfg.threshold)  # [b, B]
    floor = _rounds_floor(masked, round_index, steps_per_block).clamp(min=1)
    return above | _most_confident(confidence, masked, floor)
