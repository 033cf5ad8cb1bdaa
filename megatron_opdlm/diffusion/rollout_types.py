"""The data a rollout hands to training (and inference hands to evaluation).

Layout: prompts are left-padded to one width P so that every row's response starts at column P
(one block boundary for the whole batch); responses are R = n_blocks * B columns, right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    prompt_tokens: torch.Tensor  # [b, P] long, left-padded with pad_token_id
    prompt_valid: torch.Tensor  # [b, P] bool, False on left padding
    response_tokens: torch.Tensor  # [b, R] long, x0; pad_token_id where nothing was generated
    response_valid: torch.Tensor  # [b, R] bool, generated positions (up to and including EOS)
    step_map: torch.Tensor  # [b, R] long, round (0-based, within its block) that unmasked the
    #                         token; -1 where response_valid is False
    num_forwards: torch.Tensor  # [b] long, model forwards spent on each sequence
    confidences: torch.Tensor | None = None  # [b, R] float, probability of the sampled token
    decoded_step_map: torch.Tensor | None = None  # [b, R] long, like step_map but also for the
    #                         tokens after EOS in a sequence's last block (the sampler decoded and
    #                         attended to them); -1 only in blocks that were never decoded

    @property
    def prompt_length(self) -> int:
        return self.prompt_tokens.shape[1]

    @property
    def response_length(self) -> int:
        return self.response_tokens.shape[1]

    def response_lengths(self) -> torch.Tensor:  # [b]
        return self.response_valid.sum(dim=1)

    def decoded(self) -> torch.Tensor:  # [b, R] bool
        """Positions the sampler decoded and attended to: whole blocks, the EOS block included
        after its EOS (THE convention for the EOS block, shared by rollout and training rows:
        every column of a decoded block is a valid key). Without a decoded step map (responses
        taken from a dataset) these are the valid positions."""
        if self.decoded_step_map is None:
            return self.response_valid
        return (self.decoded_step_map >= 0) | self.response_valid

    def decoded_steps(self) -> torch.Tensor:  # [b, R] long
        """The round that unmasked each decoded position (-1 elsewhere)."""
        if self.decoded_step_map is None:
            return self.step_map.masked_fill(~self.response_valid, -1)
        return self.decoded_step_map.masked_fill(~self.decoded(), -1)

    def to(self, device) -> RolloutBatch:
        moved = {
            name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return RolloutBatch(**moved)


class RolloutResults:
    """What both decoders (the sampler's lock-step _Decoder, the engine's per-sequence _Engine)
    fill for n sequences of up to max_new_tokens response tokens, and the RolloutBatch they make
    of it: one convention for validity, step maps and confidences."""

    def __init__(self, n: int, max_new_tokens: int, model_cfg, device):
        pad, width = model_cfg.pad_token_id, max_new_tokens
        self.response = torch.full((n, width), pad, dtype=torch.long, device=device)  # [n, R]
        self.step_map = torch.full((n, width), -1, dtype=torch.long, device=device)  # [n, R]
        self.confidence = torch.zeros(n, width, dtype=torch.float32, device=device)  # [n, R]
        self.lengths = torch.zeros(n, dtype=torch.long, device=device)  # [n] tokens up to EOS
        self.num_forwards = torch.zeros(n, dtype=torch.long, device=device)  # [n]

    def _rollout_batch(
        self, prompt_tokens, prompt_valid, width: int, return_confidences: bool
    ) -> RolloutBatch:
        """The first `width` response columns (the blocks decoded), valid up to each EOS."""
        decoded_step_map = self.step_map[:, :width]
        columns = torch.arange(width, device=self.lengths.device)
        valid = columns[None, :] < self.lengths[:, None]  # [n, R]
        return RolloutBatch(
            prompt_tokens=prompt_tokens,
            prompt_valid=prompt_valid,
            response_tokens=self.response[:, :width].clone(),
            response_valid=valid,
            step_map=torch.where(valid, decoded_step_map, torch.full_like(decoded_step_map, -1)),
            num_forwards=self.num_forwards,
            confidences=(
                torch.where(valid, self.confidence[:, :width], 0.0) if return_confidences else None
            ),
            decoded_step_map=decoded_step_map.clone(),
        )
