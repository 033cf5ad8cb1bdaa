"""Training rows for the student and the teacher from a rollout and its selected states.

Student row: [prompt (P) | x0 (R) | x_t (R)], S = P + 2R, with the block-diffusion mask and position
ids of `models.masks.packed_row_mask` (x_t block b sees the prompt, x0 blocks < b and itself, at
the position ids of the x0 block it copies). Its logits are read at `logit_columns`
(`models.masks.xt_logit_columns`: the x_t column of token r, or the column before it with token
shift).

Teacher row: [prompt | x0] under a causal mask with padding; its logits at column P + r - 1
predict response token r (`distill.targets`).

The EOS block (one convention with the sampler, `RolloutBatch.decoded`): every column of a
decoded block is a valid key of the student row, the tokens after EOS included, because the
sampler attended to all B columns of that block in each of its rounds; x_t there holds what the
drawn state held (mask or token). Only blocks never decoded are padding. The teacher row keeps
`response_valid` (causal: the tail after EOS is never read by a loss position).

Loss mask [b, R]: positions masked in x_t, within response_valid, up to and including the first
end-of-sequence token of x0 (the EOS itself dropped when `exclude_eos`). Later positions are
never trained on even if the rollout marked them valid.

Position ids are the column index for teacher and student alike (left padding included): RoPE
depends only on differences of positions, so the offset that left padding adds changes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_opdlm.config import DiffusionConfig, ModelConfig
from megatron_opdlm.diffusion.rollout_types import RolloutBatch
from megatron_opdlm.models import mask_functions
from megatron_opdlm.models.masks import attention_input, packed_row_mask, xt_logit_columns


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [b, S] long, S = P + 2R: [prompt | x0 | x_t]
    position_ids: torch.Tensor  # [b, S] long
    attention_mask: torch.Tensor  # [b, 1, S, S] bool, True = masked out (or [b, 3, S] columns)
    valid: torch.Tensor  # [b, S] bool, student-row keys: False on padding and undecoded blocks
    prompt_length: int  # P
    response_length: int  # R
    block_size: int  # B
    logit_columns: torch.Tensor  # [R] long, column of the student row that predicts token r
    x0: torch.Tensor  # [b, R] long, the clean response
    x_t: torch.Tensor  # [b, R] long, the selected noisy state
    response_valid: torch.Tensor  # [b, R] bool
    loss_mask: torch.Tensor  # [b, R] bool, positions that enter the loss
    teacher_tokens: torch.Tensor  # [b, P + R] long: [prompt | x0]
    teacher_position_ids: torch.Tensor  # [b, P + R] long
    teacher_attention_mask: torch.Tensor  # [b, 1, P + R, P + R] bool causal+padding (or columns)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_loss_tokens(self) -> int:
        """Loss positions in this batch (a host sync; sum it over micro-batches and DP ranks)."""
        return int(self.loss_mask.sum())

    @property
    def num_loss_sequences(self) -> int:
        """Rows with at least one loss position (the divisor of `sequence_mean` normalisation)."""
        return int(self.loss_mask.any(dim=1).sum())

    @property
    def masked(self) -> torch.Tensor:  # [b, R] bool, masked positions of x_t within the response
        return self.response_valid & (self.x_t != self.x0)

    def rows(self, start: int, end: int) -> PackedBatch:
        """The batch restricted to rows [start, end)."""
        fields = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            keep_whole = field.name == "logit_columns" or not isinstance(value, torch.Tensor)
            fields[field.name] = value if keep_whole else value[start:end]
        return PackedBatch(**fields)

    def to(self, device) -> PackedBatch:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()}
        return PackedBatch(**moved)


def loss_positions(
    x0: torch.Tensor,  # [b, R]
    masked: torch.Tensor,  # [b, R] bool
    response_valid: torch.Tensor,  # [b, R] bool
    eos_token_ids: list[int],
    exclude_eos: bool,
) -> torch.Tensor:
    """[b, R] bool: masked valid positions up to the first EOS (inclusive unless exclude_eos)."""
    eos = torch.tensor(eos_token_ids, device=x0.device)
    is_eos = torch.isin(x0, eos) & response_valid  # [b, R]
    eos_seen = is_eos.long().cumsum(dim=1)  # [b, R], EOS count up to and including r
    after_first_eos = (eos_seen - is_eos.long()) > 0  # strictly after the first EOS
    keep = masked & response_valid & ~after_first_eos
    if exclude_eos:
        first_eos = is_eos & (eos_seen == 1)
        keep &= ~first_eos
    return keep


def pack_batch(
    rollout: RolloutBatch,
    x_t: torch.Tensor,  # [b, R] long
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig,
    exclude_eos: bool,
    mask_format: str = "dense",
) -> PackedBatch:
    """Build the student and teacher rows of one rollout batch (see the module docstring).

    `mask_format`: "dense" masks, or "columns" descriptors for a FlexAttention core
    (`models.masks.mask_format`)."""
    p, r = rollout.prompt_length, rollout.response_length
    block = diffusion_cfg.block_size
    x0 = rollout.response_tokens
    if x_t.shape != x0.shape:
        raise ValueError(f"x_t shape {tuple(x_t.shape)} differs from x0 {tuple(x0.shape)}")
    if r % block:
        raise ValueError(f"response length {r} is not a multiple of diffusion.block_size={block}")
    if p < 1 and diffusion_cfg.token_shift:
        raise ValueError("token shift needs a prompt: response token 0 is read from column P - 1")
    if p >= 1 and not bool(rollout.prompt_valid[:, -1].all()):
        raise ValueError(
            "prompts must be left-padded (last prompt column valid in every row): the response "
            "starts at one shared column P"
        )
    mask_id = model_cfg.student_mask_token_id
    decoded = rollout.decoded()  # [b, R]: response_valid plus the EOS block's tail
    masked = decoded & (x_t == mask_id)  # [b, R]
    if bool((x_t != x0)[~masked].any()):
        raise ValueError(
            "x_t differs from x0 at a position that is not a valid masked position (a decoded "
            "position holding the mask id)"
        )

    tokens = torch.cat([rollout.prompt_tokens, x0, x_t], dim=1)  # [b, S]
    valid = torch.cat([rollout.prompt_valid, decoded, decoded], dim=1)
    attention_mask, position_ids = packed_row_mask(p, r, block, valid, mask_format)  # [b, S]
    columns = xt_logit_columns(p, r, block, diffusion_cfg.token_shift).to(x0.device)  # [R]

    teacher_tokens = torch.cat([rollout.prompt_tokens, x0], dim=1)  # [b, P + R]
    teacher_valid = torch.cat([rollout.prompt_valid, rollout.response_valid], dim=1)
    teacher_positions = torch.arange(p + r, device=x0.device).expand(x0.shape[0], -1).contiguous()

    eos_ids = model_cfg.eos_token_ids
    loss_mask = loss_positions(x0, masked, rollout.response_valid, eos_ids, exclude_eos)
    return PackedBatch(
        tokens=tokens,
        position_ids=position_ids,
        attention_mask=attention_mask,
        valid=valid,
        prompt_length=p,
        response_length=r,
        block_size=block,
        logit_columns=columns,
        x0=x0,
        x_t=x_t,
        response_valid=rollout.response_valid,
        loss_mask=loss_mask,
        teacher_tokens=teacher_tokens,
        teacher_position_ids=teacher_positions,
        teacher_attention_mask=attention_input(
            mask_functions.teacher_columns(teacher_valid), mask_format
        ),
    )


def split_micro_batches(packed: PackedBatch, micro_batch_size: int) -> list[PackedBatch]:
    """Consecutive row groups of `micro_batch_size` (the batch must divide evenly)."""
    b = packed.batch_size
    if micro_batch_size < 1 or b % micro_batch_size:
        raise ValueError(
            f"batch of {b} rows does not split into micro-batches of {micro_batch_size}; "
            "make train.micro_batch_size divide the per-rank batch"
        )
    return [packed.rows(i, i + micro_batch_size) for i in range(0, b, micro_batch_size)]
