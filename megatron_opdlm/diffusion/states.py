"""State selection: which noisy state x_t of a rollout the student is trained on.

A rollout's step map records the round (0-based, within its block) that unmasked each token.
The state "before round r" of a block is x0 with every token unmasked in round r or later put
back to the mask id: exactly what the sampler saw when it ran round r.

Modes:
- per_block (OPDLM default, the reference's `_combine_rounds_one_state_per_block`): each block
  draws one of the rounds it actually ran, uniformly. The rounds a block ran are
  0..max(step_map in the block): in every such round the block still had masked tokens.
- global (the paper's Algorithm 1): one round per sequence, drawn uniformly from the rounds the
  sequence ran (0..max(step_map in the row)), applied to every block. A block that finished in
  fewer rounds than the drawn one is left clean. Drawing from the rounds actually run (rather
  than 0..steps_per_block-1) keeps rows decoded dynamically in few rounds from being all-clean.
- random (baselines opdlm_off / offpolicy / mdlm_sft, the reference's
  `_combine_rounds_random_mask`): each block draws a ratio t ~ U(0, 1) and masks each valid
  position independently with probability t (Bernoulli, not an exact count); a block that ends
  up with no masked position gets one, chosen uniformly among its valid positions.

Positions the sampler never decoded (right padding, blocks after a sequence's last block) are
never masked. The tokens after EOS in a sequence's last block were decoded (the sampler attended
to them in every round of that block), so they are masked exactly as they were in the drawn
state (`RolloutBatch.decoded_steps`): x_t is the state the sampler saw, EOS block included. They
never enter the loss (`packing.loss_positions`). All randomness comes from the caller's generator,
so a run resumes identically.
"""

from __future__ import annotations

from typing import Literal

import torch

from megatron_opdlm.diffusion.rollout_types import RolloutBatch

SelectionMode = Literal["per_block", "global", "random"]
MODES = ("per_block", "global", "random")


def _uniform(shape, generator: torch.Generator, device) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device, then moved (the same draws on CPU and GPU)."""
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _check(rollout: RolloutBatch, mode: str, block_size: int, steps_per_block: int) -> None:
    if mode not in MODES:
        raise ValueError(f"state selection mode {mode!r} is not one of {MODES}")
    if block_size < 1 or steps_per_block < 1:
        raise ValueError(
            f"block_size={block_size} and steps_per_block={steps_per_block} must be >= 1"
        )
    r = rollout.response_length
    if r % block_size:
        raise ValueError(
            f"response length {r} is not a multiple of block size {block_size}: the rollout "
            "must decode whole blocks"
        )
    shapes = {
        "response_tokens": rollout.response_tokens.shape,
        "response_valid": rollout.response_valid.shape,
        "step_map": rollout.step_map.shape,
    }
    if len(set(shapes.values())) != 1:
        raise ValueError(f"rollout tensors disagree in shape: {shapes}")
    if mode == "random":
        return
    step_map, valid = rollout.step_map, rollout.response_valid
    if bool((valid & (step_map < 0)).any()):
        raise ValueError("step_map is -1 at a position marked valid: the rollout is inconsistent")
    if bool((step_map >= steps_per_block).any()):
        raise ValueError(
            f"step_map holds round {int(step_map.max())} but steps_per_block={steps_per_block}: "
            "pass the rollout's rollout.steps_per_block"
        )


def mode_for(distill_mode: str, state_selection: str) -> SelectionMode:
    """The selection a distillation mode trains on: opdlm uses the rollout's own states
    (distill.state_selection); the baselines (opdlm_off, offpolicy, mdlm_sft) mask at random."""
    return state_selection if distill_mode == "opdlm" else "random"


def select_states(
    rollout: RolloutBatch,
    mode: SelectionMode,
    block_size: int,
    mask_token_id: int,
    steps_per_block: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """x_t [b, R]: the rollout's x0 with the selected positions replaced by `mask_token_id`."""
    _check(rollout, mode, block_size, steps_per_block)
    masked = selection_mask(rollout, mode, block_size, generator)
    return rollout.response_tokens.masked_fill(masked, mask_token_id)


def selection_mask(
    rollout: RolloutBatch, mode: SelectionMode, block_size: int, generator: torch.Generator
) -> torch.Tensor:
    """[b, R] bool, True where x_t holds the mask token (never outside the decoded blocks)."""
    valid = rollout.response_valid
    b, r = valid.shape
    n_blocks = r // block_size
    device = valid.device
    if mode == "random":
        return _random_mask(valid, block_size, generator)
    decoded = rollout.decoded()  # [b, R]; valid plus the EOS block's tail
    step = rollout.decoded_steps()  # [b, R], -1 outside the decoded blocks
    if mode == "per_block":
        rounds_run = step.view(b, n_blocks, block_size).amax(dim=2) + 1  # [b, nb]; 0 = empty block
        drawn = (_uniform((b, n_blocks), generator, device) * rounds_run).long()  # [b, nb]
        threshold = drawn.repeat_interleave(block_size, dim=1)  # [b, R]
    else:  # global
        rounds_run = step.amax(dim=1) + 1  # [b]
        drawn = (_uniform((b,), generator, device) * rounds_run).long()  # [b]
        threshold = drawn[:, None].expand(b, r)
    return decoded & (step >= threshold)


def _random_mask(valid: torch.Tensor, block_size: int, generator: torch.Generator) -> torch.Tensor:
    b, r = valid.shape
    n_blocks = r // block_size
    device = valid.device
    blocks_valid = valid.view(b, n_blocks, block_size)  # [b, nb, B]
    ratio = _uniform((b, n_blocks, 1), generator, device)  # [b, nb, 1]
    masked = (_uniform((b, n_blocks, block_size), generator, device) < ratio) & blocks_valid
    # A block with valid positions but nothing masked gets one masked position, uniformly.
    needs_one = blocks_valid.any(dim=2) & ~masked.any(dim=2)  # [b, nb]
    scores = _uniform((b, n_blocks, block_size), generator, device).masked_fill(~blocks_valid, -1)
    pick = torch.nn.functional.one_hot(scores.argmax(dim=2), block_size).bool()  # [b, nb, B]
    masked |= pick & needs_one[:, :, None]
    return masked.view(b, r)


def mask_ratio_per_position(masked: torch.Tensor, valid: torch.Tensor, block_size: int):
    """[b, R] float: fraction of its block's valid positions that are masked (0 on empty blocks).

    The masking-ratio bucket of the loss metrics is read from this.
    """
    b, r = valid.shape
    n_blocks = r // block_size
    masked_count = masked.view(b, n_blocks, block_size).sum(dim=2).float()  # [b, nb]
    valid_count = valid.view(b, n_blocks, block_size).sum(dim=2).float()
    ratio = masked_count / valid_count.clamp(min=1)
    return ratio.repeat_interleave(block_size, dim=1)  # [b, R]
