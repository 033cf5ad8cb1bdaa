"""Rollout batches for each mode, their row slices, and the generators that make them.

Every random draw of a step comes from a generator seeded by (run seed, stream, rollout step,
index): the data-parallel rank for rollout sampling, the global row for state selection. A resumed
run redraws exactly what the uninterrupted run drew, whatever the global RNG state, and all ranks
of a model-parallel group (which decode the same prompts) draw the same numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from megatron_opdlm.config import JobConfig
from megatron_opdlm.data.prompts import PromptRecord
from megatron_opdlm.diffusion.packing import PackedBatch, pack_batch, split_micro_batches
from megatron_opdlm.diffusion.rollout_types import RolloutBatch
from megatron_opdlm.diffusion.sampler import left_pad
from megatron_opdlm.diffusion.states import select_states
from megatron_opdlm.models.flex_attention import mask_format_for

STREAMS = {"rollout": 1, "states": 2, "eval_rollout": 3, "eval_states": 4}

# State selection per mode: on-policy modes use the rollout's own step map; the baselines mask
# at random (the paper's ablations).
SELECTION = {"opdlm": None, "opdlm_off": "random", "offpolicy": "random", "mdlm_sft": "random"}


def step_generator(seed: int, stream: str, step: int, dp_rank: int) -> torch.Generator:
    """A CPU generator for one (stream, step, DP rank); identical on TP/PP peers."""
    entropy = np.random.SeedSequence([seed, STREAMS[stream], step, dp_rank])
    return torch.Generator().manual_seed(int(entropy.generate_state(1, dtype=np.uint64)[0] >> 1))


def rollout_rows(rollout: RolloutBatch, start: int, end: int) -> RolloutBatch:
    """Rows [start, end) of a rollout batch."""
    fields = {}
    for field in dataclasses.fields(rollout):
        value = getattr(rollout, field.name)
        fields[field.name] = value[start:end] if isinstance(value, torch.Tensor) else value
    return RolloutBatch(**fields)


def trim_response(rollout: RolloutBatch, block_size: int) -> RolloutBatch:
    """Drop response columns past the longest valid response (rounded up to a block).

    Only right-hand columns go, so positions and masks of the kept columns are unchanged; an
    optimizer step over short responses then does not pay for the batch's longest one.
    """
    longest = int(rollout.response_valid.sum(dim=1).max()) if rollout.response_length else 0
    width = max(block_size, -(-longest // block_size) * block_size)
    if width >= rollout.response_length:
        return rollout
    fields = {}
    for field in dataclasses.fields(rollout):
        value = getattr(rollout, field.name)
        is_response = isinstance(value, torch.Tensor) and value.dim() == 2 and field.name not in (
            "prompt_tokens", "prompt_valid")  # fmt: skip
        fields[field.name] = value[:, :width] if is_response else value
    return RolloutBatch(**fields)


def given_responses(
    records: list[PromptRecord], job: JobConfig, length_cap: int, device
) -> RolloutBatch:
    """A RolloutBatch from the dataset's responses (offpolicy / mdlm_sft), cut at `length_cap`.

    step_map is 0 on valid positions: these modes select states at random and never read it.
    """
    block = job.diffusion.block_size
    pad = job.model.pad_token_id
    responses = [r.response_ids[:length_cap] for r in records]
    width = max(block, -(-max(len(r) for r in responses) // block) * block)
    prompt_tokens, prompt_valid = left_pad([r.prompt_ids for r in records], pad, device)
    tokens = torch.full((len(records), width), pad, dtype=torch.long)
    valid = torch.zeros(len(records), width, dtype=torch.bool)
    for i, response in enumerate(responses):
        tokens[i, : len(response)] = torch.tensor(response, dtype=torch.long)
        valid[i, : len(response)] = True
    valid = valid.to(device)
    return RolloutBatch(
        prompt_tokens=prompt_tokens,
        prompt_valid=prompt_valid,
        response_tokens=tokens.to(device),
        response_valid=valid,
        step_map=torch.where(valid, 0, -1),
        num_forwards=torch.zeros(len(records), dtype=torch.long, device=device),
    )


def select_noisy_states(
    rollout: RolloutBatch, job: JobConfig, step: int, first_row: int, stream: str = "states"
) -> torch.Tensor:
    """x_t [b, R]; row i draws from a generator of its global row index first_row + i.

    Per-row generators, drawing over the row's own blocks only, make the states independent of
    how rows are batched, so a run at DP=2 trains on exactly the states of a run at DP=1.
    """
    mode = SELECTION[job.distill.mode] or job.distill.state_selection
    x_t = rollout.response_tokens.clone()  # [b, R]; never masked past a row's own blocks
    for i in range(rollout.prompt_tokens.shape[0]):
        generator = step_generator(job.train.seed, stream, step, first_row + i)
        # The row alone, cut to its own blocks: the draws must not depend on the batch width.
        row = trim_response(rollout_rows(rollout, i, i + 1), job.diffusion.block_size)
        width = row.response_length
        x_t[i, :width] = select_states(
            row, mode, job.diffusion.block_size, job.model.student_mask_token_id,
            job.rollout.steps_per_block, generator,
        )[0]  # fmt: skip
    return x_t


def pack_rows(
    rollout: RolloutBatch, x_t: torch.Tensor, job: JobConfig, start: int, end: int
) -> list[PackedBatch]:
    """Micro-batches of rows [start, end) (one optimizer step), trimmed to their longest
    response and packed; the [b, 1, S, S] masks exist for one optimizer step at a time."""
    rows = rollout_rows(rollout, start, end)
    rows_x_t = x_t[start:end]
    trimmed = trim_response(rows, job.diffusion.block_size)
    rows_x_t = rows_x_t[:, : trimmed.response_length]
    packed = pack_batch(
        trimmed, rows_x_t, job.model, job.diffusion, job.distill.exclude_eos,
        mask_format=mask_format_for(job.precision),
    )  # fmt: skip
    return split_micro_batches(packed, job.train.micro_batch_size)
