"""The logits a denoising round reads, with and without the KV cache (same numbers either way).

Layout (see models.masks): the prompt is left-padded to P columns and block-causal with blocks
aligned to the response start P; response block k spans columns [P + kB, P + (k+1)B). Position
ids are column indices (RoPE is relative, so left padding only shifts every row's absolute
positions, never the distances the model sees).

`block_logits(x, masked)` returns [b, B, V] on the last pipeline stage (None elsewhere): row j
holds the logits that predict block position j:
- no token shift: the query of position j itself;
- token shift: the query of position j - 1; for j = 0 the last committed token (the previous
  block's last token, or the last prompt token), whose block-causal context is exactly the
  committed prefix, so it is computed once per block ("carry") and never sees the block.
Rows that predict nothing masked may hold anything.
"""

from __future__ import annotations

import torch

from megatron_opdlm.diffusion.kv_cache import BlockKVCache, ExplicitMasks
from megatron_opdlm.diffusion.model_runner import ModelRunner
from megatron_opdlm.models import mask_functions
from megatron_opdlm.models.masks import attention_input, mask_format


def _rows(*ranges: tuple[int, int], device) -> torch.Tensor:
    """Query rows to project: the concatenated ranges [lo, hi) (possibly none)."""
    parts = [torch.arange(lo, hi, device=device) for lo, hi in ranges]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


class FullBlockForward:
    """No cache: every round runs the whole sequence [prompt | committed blocks | block]."""

    def __init__(
        self,
        runner: ModelRunner,
        prompt: torch.Tensor,
        key_valid: torch.Tensor,
        block_size: int,
        token_shift: bool,
    ):
        self.runner, self.prompt, self.key_valid = runner, prompt, key_valid  # [b, P], [b, P+R]
        self.block_size, self.token_shift = block_size, token_shift
        self.committed: list[torch.Tensor] = []  # finished blocks, [b, B] each
        self.mask_format = mask_format(runner.chunks)  # dense, or columns for a flex core

    def block_logits(self, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor | None:
        sequence = torch.cat([self.prompt, *self.committed, x], dim=1)  # [b, L]
        b, length = sequence.shape
        p, bs = self.prompt.shape[1], self.block_size
        columns = mask_functions.student_columns(length, p, bs, valid=self.key_valid[:, :length])
        mask = attention_input(columns, self.mask_format)  # [b, 1, L, L] or [b, 3, L]
        positions = torch.arange(length, device=x.device).expand(b, -1)
        first = length - bs - 1 if self.token_shift else length - bs
        rows = _rows((first, first + bs), device=x.device)
        return self.runner.forward(sequence, positions, mask, rows)

    def finish_block(self, x: torch.Tensor) -> None:
        self.committed.append(x)

    def free(self) -> None:
        self.committed.clear()


class CachedBlockForward:
    """Prompt and finished blocks encoded once into a BlockKVCache; rounds run the block only."""

    def __init__(
        self,
        runner: ModelRunner,
        prompt: torch.Tensor,
        key_valid: torch.Tensor,
        block_size: int,
        token_shift: bool,
    ):
        self.runner, self.key_valid = runner, key_valid  # [b, P + R] bool
        self.block_size, self.token_shift = block_size, token_shift
        b, p = prompt.shape
        self.prompt_length = p
        self.cache = BlockKVCache(b, key_valid.shape[1])
        self.explicit_masks = ExplicitMasks(runner.chunks)
        self.mask_format = mask_format(runner.chunks)  # dense, or columns for a flex core
        self.pending: torch.Tensor | None = None  # finished block not yet in the cache, [b, B]
        self.carry: torch.Tensor | None = None  # [b, V] logits of the last committed token
        # prefill: the block-causal prompt, pad keys masked (a pad query sees only itself)
        columns = mask_functions.student_columns(p, p, block_size, valid=key_valid[:, :p])
        mask = attention_input(columns, self.mask_format)  # [b, 1, P, P] or [b, 3, P]
        rows = (
            _rows((p - 1, p), device=prompt.device) if token_shift else _rows(device=prompt.device)
        )
        logits = self._forward(prompt, mask, rows)
        if token_shift and logits is not None:
            self.carry = logits[:, 0]
        self.cache.commit(p)

    def _forward(self, queries: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor):
        b, n = queries.shape
        offset = self.cache.offset
        positions = torch.arange(offset, offset + n, device=queries.device).expand(b, -1)
        with self.explicit_masks:
            return self.runner.forward(queries, positions, mask, rows, self.cache.context)

    def _mask(self, num_queries: int) -> torch.Tensor:
        """[b, 1, n, offset + n] (or the [b, 3, offset + n] columns): queries at columns offset..
        see the committed prefix, their own block and earlier query blocks (block-causal on clean
        tokens), never padding."""
        columns = mask_functions.rollout_round_columns(
            self.cache.offset, num_queries, self.prompt_length, self.block_size, self.key_valid
        )
        return attention_input(columns, self.mask_format, num_queries=num_queries)

    def block_logits(self, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor | None:
        bs, device = self.block_size, x.device
        # with token shift, position 0 reads the carry: a round where only position 0 is still
        # masked needs no block forward (block size 1 becomes plain cached AR decoding)
        need_block = bool(masked[:, 1:].any()) if self.token_shift else True
        queries, row_ranges, block_start = [], [], 0
        if self.pending is not None:
            queries.append(self.pending)
            if self.token_shift:
                row_ranges.append((bs - 1, bs))
            block_start = bs
        if need_block:
            queries.append(x)
            last = bs - 1 if self.token_shift else bs
            row_ranges.append((block_start, block_start + last))
        logits = None
        if queries:
            query_tokens = torch.cat(queries, dim=1)  # [b, n]
            rows = _rows(*row_ranges, device=device)
            logits = self._forward(query_tokens, self._mask(query_tokens.shape[1]), rows)
            if self.pending is not None:  # fused commit: the finished block's K/V are clean now
                self.cache.commit(bs)
                self.pending = None
                if self.token_shift and logits is not None:
                    self.carry, logits = logits[:, 0], logits[:, 1:]
        if not self.runner.is_last_stage:
            return None
        if not self.token_shift:
            return logits
        block_rows = logits if need_block else self.carry[:, None].expand(-1, bs - 1, -1)
        return torch.cat([self.carry[:, None], block_rows], dim=1)  # [b, B, V]

    def finish_block(self, x: torch.Tensor) -> None:
        self.pending = x

    def free(self) -> None:
        self.cache.free()
        self.pending = self.carry = None
