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

    def row_slice(self, start: int, end: int) -> RolloutBatch:
        """Rows [start, end) in the layout a rollout of those rows alone has: the left padding
        trimmed to their widest prompt, the columns to their decoded blocks (a whole-batch
        rollout pads every row to the widest of all; consumers that forward [b, P + R] rows,
        e.g. the evaluation's teacher NLL, then pay only for these rows' widths)."""
        rows = slice(start, end)
        prompt_valid = self.prompt_valid[rows]  # [b, P]
        # left-padded: the first column any row uses starts the trimmed prompt
        first = prompt_valid.shape[1] - int(prompt_valid.sum(dim=1).max())
        decoded = self.decoded()[rows]  # [b, R]; decoded blocks are a prefix of the columns
        width = int(decoded.any(dim=0).sum())

        def cut(value):  # [b, R] response-side tensors (or None)
            return None if value is None else value[rows, :width]

        return RolloutBatch(
            prompt_tokens=self.prompt_tokens[rows, first:],
            prompt_valid=prompt_valid[:, first:],
            response_tokens=cut(self.response_tokens),
            response_valid=cut(self.response_valid),
            step_map=cut(self.step_map),
            num_forwards=self.num_forwards[rows],
            confidences=cut(self.confidences),
            decoded_step_map=cut(self.decoded_step_map),
        )

    def to(self, device) -> RolloutBatch:
        moved = {
            name: (value.to(device) if isinstance(value, torch.Tensor) else value)
            for name, value in self.__dict__.items()
        }
        return RolloutBatch(**moved)


def concat_batches(batches: list[RolloutBatch], pad_token_id: int) -> RolloutBatch:
    """The rows of `batches` in order, as one batch: prompts left-padded to the widest, responses
    right-padded to the longest (pad tokens, not valid, step -1, confidence 0)."""
    p = max(b.prompt_length for b in batches)
    r = max(b.response_length for b in batches)

    def left(value, fill):  # [b, P_i] -> [b, p]
        return torch.nn.functional.pad(value, (p - value.shape[1], 0), value=fill)

    def right(value, fill):  # [b, R_i] -> [b, r] (None stays None)
        if value is None:
            return None
        return torch.nn.functional.pad(value, (0, r - value.shape[1]), value=fill)

    def cat(name, pad, fill):
        values = [pad(getattr(b, name), fill) for b in batches]
        return None if values[0] is None else torch.cat(values)

    return RolloutBatch(
        prompt_tokens=cat("prompt_tokens", left, pad_token_id),
        prompt_valid=cat("prompt_valid", left, False),
        response_tokens=cat("response_tokens", right, pad_token_id),
        response_valid=cat("response_valid", right, False),
        step_map=cat("step_map", right, -1),
        num_forwards=torch.cat([b.num_forwards for b in batches]),
        confidences=cat("confidences", right, 0.0),
        decoded_step_map=cat("decoded_step_map", right, -1),
    )


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
