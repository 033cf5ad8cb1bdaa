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
