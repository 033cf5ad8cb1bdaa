"""Held-out mean KL: the student's own rollouts on held-out prompts, scored against the teacher.

The measure the method minimises, on data it never trained on: each DP rank rolls out its share
of data.eval_prompts with the student (rollout config, cap rollout.max_new_tokens), selects one
state per block from the step map, and the mean forward KL(p_T || p_S) over the loss positions is
reduced over all ranks. Generators are seeded by the run seed only (not the step), so successive
evaluations draw the same random numbers and differ only through the student.

Memory: the loss-token counts (the divisor of the KL) are taken from the rollouts and their states
(O(rows x R) tokens); each chunk's packed rows and dense masks are built only when it is scored and
dropped after, so evaluation holds one chunk's masks at a time, not every micro-batch's.
"""

from __future__ import annotations

import copy

import torch
from megatron.core import parallel_state

from megatron_opdlm.config import JobConfig
from megatron_opdlm.data.prompts import PromptDataset
from megatron_opdlm.diffusion.engine import generate_rollout
from megatron_opdlm.diffusion.model_runner import fp8_off
from megatron_opdlm.diffusion.packing import loss_positions
from megatron_opdlm.runtime import collectives
from megatron_opdlm.training import batches
from megatron_opdlm.training.metrics import reduce_loss_metrics
from megatron_opdlm.training.steps import run_step


def _eval_job(job: JobConfig) -> JobConfig:
    scored = copy.deepcopy(job)
    scored.distill.mode = "opdlm"
    scored.distill.divergence = "forward_kl"
    scored.distill.normalization = "global_tokens"
    return scored


@torch.no_grad()
def evaluate_kl(models, data: PromptDataset, job: JobConfig, dp_rank: int, dp_size: int) -> dict:
    if models.teacher is None:
        raise ValueError("held-out KL needs the teacher; it was not built")
    scored = _eval_job(job)
    mine = [data[i] for i in range(dp_rank, len(data), dp_size)]
    chunk = max(1, job.train.prompts_per_rollout // dp_size)
    micro_size = job.train.micro_batch_size
    states, counts = [], [0, 0]  # (rollout, x_t) per chunk; local loss tokens, loss sequences
    for index, start in enumerate(range(0, len(mine), chunk)):
        records = mine[start : start + chunk]
        rollout = generate_rollout(
            models.student, [r.prompt_ids for r in records], job.model, job.diffusion,
            job.rollout, max_new_tokens=job.rollout.max_new_tokens, slots=job.rollout.slots,
            generator=batches.step_generator(job.train.seed, "eval_rollout", index, dp_rank),
        )  # fmt: skip
        x_t = batches.select_noisy_states(
            rollout, scored, 0, dp_rank * len(data) + start, stream="eval_states"
        )
        # [b, R]: the packed rows' loss mask, without building their [S, S] masks
        loss = loss_positions(
            rollout.response_tokens, rollout.decoded() & (x_t == job.model.student_mask_token_id),
            rollout.response_valid, job.model.eos_token_ids, scored.distill.exclude_eos,
        )  # fmt: skip
        counts[0] += int(loss.sum())
        counts[1] += int(loss.any(dim=1).sum())
        states.append((rollout, x_t))
    counts = collectives.all_reduce_values(counts, group=parallel_state.get_data_parallel_group())
    metric_dicts = []
    # DP ranks may hold different numbers of eval micro-batches: the student scores in its
    # parameter dtype, so no FP8 amax reduction waits on the data-parallel group.
    with fp8_off(models.student):
        while states:
            rollout, x_t = states.pop(0)
            # Micro-batches of one row: eval chunks need not divide by train.micro_batch_size.
            scored.train.micro_batch_size = 1
            micro = batches.pack_rows(rollout, x_t, scored, 0, rollout.prompt_tokens.shape[0])
            scored.train.micro_batch_size = micro_size
            # Teacher targets per micro-batch, inside the student's forward-only schedule.
            output = run_step(models.student, models.teacher, micro, scored, int(counts[0]),
                              int(counts[1]), forward_only=True)  # fmt: skip
            metric_dicts += output.metrics
    summary = reduce_loss_metrics(metric_dicts, with_teacher=True)
    return {"kl": summary.get("divergence", float("nan")),
            "loss_tokens": summary.get("loss_tokens", 0.0)}  # fmt: skip
