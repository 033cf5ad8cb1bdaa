"""What the teacher thinks of a model's responses: its per-token NLL, and the forward KL on the
model's own (on-policy) states.

- Teacher NLL: one causal teacher forward over [prompt | response]; -log p_T(token) at every
  response position up to and including the first end-of-sequence, summed with the count (the
  mean is the ratio over a whole evaluation, so long and short answers weigh per token).
- On-policy KL: the distillation loss itself, evaluated: one state per block drawn from the
  rollout's step map (`diffusion.states`), packed training rows (`diffusion.packing`), the
  teacher's next-token targets and the student's logits at the x_t positions, forward
  KL(p_T || p_S) summed over the loss positions (`distill.loss.distill_loss`).

The forwards go through `diffusion.model_runner.ModelRunner`, which gathers full-vocabulary
logits for the rows asked for, so these work at any TP/PP layout; results computed on the last
pipeline stage are broadcast to every rank.
"""

from __future__ import annotations

import torch

from megatron_opdlm.config import DistillConfig
from megatron_opdlm.diffusion.model_runner import ModelRunner
from megatron_opdlm.diffusion.packing import PackedBatch, pack_batch
from megatron_opdlm.diffusion.rollout_types import RolloutBatch
from megatron_opdlm.diffusion.states import select_states
from megatron_opdlm.distill import vocab_parallel
from megatron_opdlm.distill.loss import distill_loss
from megatron_opdlm.distill.targets import TeacherTargets
from megatron_opdlm.evaluation.models import EvalModel
from megatron_opdlm.models import mask_functions
from megatron_opdlm.models.masks import attention_input, mask_format
from megatron_opdlm.models.vocab import mask_invalid_logits

_KL_CONFIG = DistillConfig(mode="opdlm", divergence="forward_kl", normalization="global_tokens")


def _teacher_logprobs(
    runner: ModelRunner,
    teacher: EvalModel,
    tokens: torch.Tensor,  # [b, P + R]
    valid: torch.Tensor,  # [b, P + R] bool
    prompt_length: int,
) -> torch.Tensor | None:
    """[b, R, V] teacher log-probs of response tokens 0..R-1 (read at columns P-1..P+R-2)."""
    b, width = tokens.shape
    positions = torch.arange(width, device=tokens.device).expand(b, -1)
    rows = torch.arange(prompt_length - 1, width - 1, device=tokens.device)  # [R]
    mask = attention_input(mask_functions.teacher_columns(valid), mask_format(runner.chunks))
    logits = runner.forward(tokens, positions, mask, rows)  # [b, R, V]
    if logits is None:
        return None
    logits = mask_invalid_logits(logits, teacher.model_cfg)
    return vocab_parallel.log_softmax(vocab_parallel.upcast(logits), None)


def _share(runner: ModelRunner, values: torch.Tensor | None, size: int) -> torch.Tensor:
    """A float64 vector computed on the last pipeline stage, on every rank."""
    if values is None:
        values = torch.zeros(size, dtype=torch.float64)
    device = next(runner.chunks[0].parameters()).device
    return runner.broadcast_from_last_stage(values.to(device=device, dtype=torch.float64)).cpu()


@torch.no_grad()
def teacher_nll(teacher: EvalModel, batch: RolloutBatch) -> tuple[float, int]:
    """(sum of -log p_T over valid response tokens, their count) for one rollout batch."""
    if batch.prompt_length < 1:
        raise ValueError("teacher NLL needs a prompt: token 0 is predicted from column P - 1")
    runner = ModelRunner(teacher.chunks)
    count = int(batch.response_valid.sum())
    if count == 0:
        return 0.0, 0
    tokens = torch.cat([batch.prompt_tokens, batch.response_tokens], dim=1)  # [b, P + R]
    valid = torch.cat([batch.prompt_valid, batch.response_valid], dim=1)
    logprobs = _teacher_logprobs(runner, teacher, tokens, valid, batch.prompt_length)
    total = None
    if logprobs is not None:
        picked = logprobs.gather(-1, batch.response_tokens[..., None]).squeeze(-1)  # [b, R]
        total = -picked[batch.response_valid].sum().reshape(1)
    return float(_share(runner, total, 1)[0]), count


def onpolicy_states(
    student: EvalModel, batch: RolloutBatch, generator: torch.Generator
) -> PackedBatch:
    """Packed training rows of one state per block drawn from the rollout's step map."""
    block = student.diffusion_cfg.block_size
    x_t = select_states(
        batch, "per_block", block, student.model_cfg.student_mask_token_id, block, generator
    )
    return pack_batch(
        batch, x_t, student.model_cfg, student.diffusion_cfg, exclude_eos=False,
        mask_format=mask_format(student.chunks),
    )  # fmt: skip


@torch.no_grad()
def onpolicy_kl(
    teacher: EvalModel, student: EvalModel, batch: RolloutBatch, generator: torch.Generator
) -> tuple[float, int]:
    """(sum of KL(p_T || p_S) over the loss positions, their count) for one student rollout
    (decoded with steps_per_block = block size, as `decoding` does)."""
    packed = onpolicy_states(student, batch, generator)
    count = packed.num_loss_tokens
    if count == 0:
        return 0.0, 0
    teacher_runner, student_runner = ModelRunner(teacher.chunks), ModelRunner(student.chunks)
    p = packed.prompt_length
    teacher_valid = torch.cat([packed.valid[:, :p], packed.response_valid], dim=1)  # [b, P + R]
    teacher_logp = _teacher_logprobs(
        teacher_runner, teacher, packed.teacher_tokens, teacher_valid, p
    )
    student_logits = student_runner.forward(
        packed.tokens, packed.position_ids, packed.attention_mask, packed.logit_columns
    )
    total = None
    if teacher_logp is not None and student_logits is not None:  # the last pipeline stage
        _, metrics = distill_loss(
            student_logits,
            TeacherTargets(logprobs=teacher_logp),
            packed,
            _KL_CONFIG,
            count,
            model_cfg=student.model_cfg,
            group=None,
        )
        total = metrics["divergence_sum"].reshape(1)
    return float(_share(student_runner, total, 1)[0]), count
