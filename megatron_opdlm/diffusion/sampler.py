"""The block-diffusion sampler: the one implementation behind on-policy rollouts and inference.

    batch = generate(student_chunks, prompts, model_cfg, diffusion_cfg, rollout_cfg,
                     max_new_tokens=256, generator=torch.Generator().manual_seed(0))

Decoding (the README's sampler): prompts are left-padded to one width P; the response is decoded
block by block. Each block starts as B mask tokens; each round scores the block given the committed
context, proposes a token at every masked position (greedy or temperature / top-k / top-p) with
its probability as confidence, and a remasking strategy (static / dynamic, a registry) picks
which positions to unmask. A block has at most `steps_per_block` rounds. A sequence stops after
the block holding its first end-of-sequence token (the block is finished first) or at the cap.

Parallelism: every rank of a model-parallel group (TP x PP) passes the same prompts; data-parallel
ranks pass their own. Logits are gathered over TP and sampled identically on every TP rank; with
PP only the last stage samples and broadcasts its decisions, so every rank ends with the same
tokens. Every rank draws the same uniform numbers ([b, B] per round) from `generator`, which
keeps generators in step across the group and makes a seeded rollout independent of TP size.

`num_forwards` counts the rounds each sequence took part in, one model forward per round (the
first round of a block also commits the previous block to the cache, the prefill is not
counted); tokens / num_forwards is the decoding parallelism (1 for static 1 token per step).

`rollout_cfg.use_kv_cache` picks the cached path (prompt and finished blocks encoded once) or the
no-cache path (whole sequence each round); they give the same tokens (logits within fp32
rounding). The cache is freed before returning.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_opdlm.config import DiffusionConfig, ModelConfig, RolloutConfig
from megatron_opdlm.diffusion.block_forward import CachedBlockForward, FullBlockForward
from megatron_opdlm.diffusion.model_runner import ModelRunner, decoding_mode
from megatron_opdlm.diffusion.remasking import RemaskingStrategy, get_remasking, round_schedule
from megatron_opdlm.diffusion.rollout_types import RolloutBatch, RolloutResults
from megatron_opdlm.diffusion.sampling import propose_tokens
from megatron_opdlm.models.vocab import mask_invalid_logits
from megatron_opdlm.runtime import collectives

# round_callback(block, round, logits [b, B, V], x [b, B], masked [b, B], select [b, B]):
# called on the last pipeline stage after each round's decision (tests, analysis).
RoundCallback = Callable[[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
# should_abort(block_index) -> bool: asked before each block on every rank of the model-parallel
# group (they decode the same blocks); True on one of them must be True on all (the caller
# agrees over the group). The trainer uses it to honour a stop request inside a long rollout.
AbortCheck = Callable[[int], bool]


class RolloutAborted(RuntimeError):
    """generate() stopped before a block because `should_abort` said so; nothing is returned."""


# stop_rows(response [b, w], lengths [b]) -> [b] bool: called after each committed block on every
# rank (the same tokens everywhere); rows where it is True end there, as at an EOS (stop strings).
StopRows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def validate_request(
    prompts: list[list[int]],
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig,
    rollout_cfg: RolloutConfig,
    max_new_tokens: int,
) -> RemaskingStrategy:
    """Check a generate() call before any work; returns the remasking strategy."""
    rollout_cfg.validate()
    diffusion_cfg.validate()
    strategy = get_remasking(rollout_cfg.remasking)
    block = diffusion_cfg.block_size
    round_schedule(block, rollout_cfg.steps_per_block)  # raises when steps > block size
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts is empty: pass a list of token-id lists (one per sequence)")
    if max_new_tokens < 1 or max_new_tokens % block:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is not a positive multiple of "
            f"diffusion.block_size={block}: responses are decoded in whole blocks"
        )
    mask_id = model_cfg.student_mask_token_id
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: every sequence needs at least one token")
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= model_cfg.vocab_size:
            raise ValueError(
                f"prompt {i} has token id {low if low < 0 else high} outside "
                f"[0, model.vocab_size={model_cfg.vocab_size}); was it encoded by another "
                "tokenizer?"
            )
        if mask_id in prompt:
            raise ValueError(f"prompt {i} contains the mask token id {mask_id}")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > model_cfg.max_position_embeddings:
        raise ValueError(
            f"the longest prompt ({longest} tokens) + max_new_tokens={max_new_tokens} exceeds "
            f"model.max_position_embeddings={model_cfg.max_position_embeddings}; shorten the "
            "prompt or lower max_new_tokens"
        )
    return strategy


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, P] tokens left-padded with pad_id, and [b, P] bool valid (False on padding)."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, prompt in enumerate(prompts):
        tokens[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        valid[i, width - len(prompt) :] = True
    return tokens.to(device), valid.to(device)


def _check_same_prompts(prompts: list[list[int]], device) -> None:
    """Every rank of a model-parallel group must decode the same prompts (a cheap fingerprint)."""
    if not dist.is_initialized() or parallel_state.get_model_parallel_group().size() == 1:
        return
    fingerprint = [len(prompts), sum(len(p) for p in prompts)]
    fingerprint.append(sum((i + 1) * (t % 65521) for p in prompts for i, t in enumerate(p)) % 2**31)
    group = parallel_state.get_model_parallel_group()
    high = collectives.all_reduce_values(fingerprint, op="max", group=group)
    low = collectives.all_reduce_values(fingerprint, op="min", group=group)
    if high != low:
        raise ValueError(
            "ranks of one model-parallel group (TP x PP) passed different prompts to generate(); "
            "shard prompts over data-parallel ranks only"
        )


def _model_device(model_chunks) -> torch.device:
    return next(model_chunks[0].parameters()).device


@torch.no_grad()
def generate(
    model_chunks: list[torch.nn.Module],
    prompts: list[list[int]],
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig,
    rollout_cfg: RolloutConfig,
    max_new_tokens: int,
    generator: torch.Generator | None = None,
    return_confidences: bool = False,
    round_callback: RoundCallback | None = None,
    should_abort: AbortCheck | None = None,
    stop_rows: StopRows | None = None,
) -> RolloutBatch:
    """Decode `prompts` (this data-parallel rank's) with the block-diffusion sampler.

    Deterministic given `generator` (None: torch's default CPU generator). The response width is
    the number of blocks actually decoded times B (<= max_new_tokens). `should_abort` (see
    AbortCheck) is asked before every block; when it answers True the partial rollout is dropped
    and RolloutAborted is raised.
    """
    strategy = validate_request(prompts, model_cfg, diffusion_cfg, rollout_cfg, max_new_tokens)
    runner = ModelRunner(model_chunks)
    device = _model_device(model_chunks)
    _check_same_prompts(prompts, device)
    decoder = _Decoder(
        runner, prompts, model_cfg, diffusion_cfg, rollout_cfg, max_new_tokens, strategy,
        generator, device,
    )  # fmt: skip
    decoder.callback, decoder.should_abort = round_callback, should_abort
    decoder.stop_rows = stop_rows
    with decoding_mode(model_chunks):
        return decoder.run(return_confidences)


class _Decoder(RolloutResults):
    """State of one rollout batch: the response so far, step map, confidences, stop flags."""

    def __init__(
        self, runner, prompts, model_cfg, diffusion_cfg, rollout_cfg, max_new_tokens, strategy,
        generator, device,
    ):  # fmt: skip
        self.runner, self.strategy, self.generator = runner, strategy, generator
        self.callback: RoundCallback | None = None
        self.should_abort: AbortCheck | None = None
        self.stop_rows: StopRows | None = None
        self.model_cfg, self.rollout_cfg = model_cfg, rollout_cfg
        prompt_tokens, prompt_valid = left_pad(prompts, model_cfg.pad_token_id, device)  # [b, P]
        self.prompt_tokens, self.prompt_valid = prompt_tokens, prompt_valid
        self.block_size, self.token_shift = diffusion_cfg.block_size, diffusion_cfg.token_shift
        b = prompt_tokens.shape[0]
        self.batch, self.device = b, device
        self.num_blocks = max_new_tokens // self.block_size
        super().__init__(b, max_new_tokens, model_cfg, device)  # [b, R] results
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        self.eos_ids = torch.tensor(model_cfg.eos_token_ids, dtype=torch.long, device=device)
        response_valid = torch.ones(b, max_new_tokens, dtype=torch.bool, device=device)
        self.key_valid = torch.cat([prompt_valid, response_valid], dim=1)  # [b, P + R]

    def _uniform(self) -> torch.Tensor | None:
        if self.rollout_cfg.temperature == 0:
            return None
        generator_device = self.generator.device if self.generator is not None else "cpu"
        shape = (self.batch, self.block_size)
        return torch.rand(shape, generator=self.generator, device=generator_device).to(self.device)

    def _decide(self, logits, x, masked, round_index, block_index):
        """Last stage: propose tokens and pick the ones to unmask. Returns [b, B, 3] float64."""
        b, bs = x.shape
        uniform = self._uniform()  # drawn on every rank: generators stay in step
        if not self.runner.is_last_stage:
            return torch.empty(b, bs, 3, dtype=torch.float64, device=self.device)
        logits = mask_invalid_logits(logits, self.model_cfg)  # [b, B, V]
        flat_uniform = uniform.reshape(-1) if uniform is not None else None
        tokens, confidence = propose_tokens(
            logits.reshape(b * bs, -1), self.rollout_cfg, flat_uniform
        )
        tokens, confidence = tokens.view(b, bs), confidence.view(b, bs)
        select = self.strategy(
            confidence, masked, round_index, self.rollout_cfg.steps_per_block, self.rollout_cfg
        )
        if self.callback is not None:
            self.callback(block_index, round_index, logits, x.clone(), masked.clone(), select)
        return torch.stack([tokens.double(), confidence.double(), select.double()], dim=-1)

    def _decode_block(self, forward, block_index: int) -> torch.Tensor:
        b, bs = self.batch, self.block_size
        active = ~self.done
        mask_id, pad_id = self.model_cfg.student_mask_token_id, self.model_cfg.pad_token_id
        x = torch.where(active, mask_id, pad_id)[:, None].repeat(1, bs)  # [b, B]; finished: pad
        masked = active[:, None].expand(b, bs).clone()
        columns = slice(block_index * bs, (block_index + 1) * bs)
        for round_index in range(self.rollout_cfg.steps_per_block):
            if not masked.any():
                break
            logits = forward.block_logits(x, masked)
            decision = self._decide(logits, x, masked, round_index, block_index)
            decision = self.runner.broadcast_from_last_stage(decision)
            tokens, confidence = decision[..., 0].long(), decision[..., 1].float()
            select = decision[..., 2].bool() & masked
            self.num_forwards += masked.any(dim=1).long()
            x = torch.where(select, tokens, x)
            masked &= ~select
            self.step_map[:, columns].masked_fill_(select, round_index)
            self.confidence[:, columns] = torch.where(
                select, confidence, self.confidence[:, columns]
            )
        if masked.any():
            raise RuntimeError(
                f"remasking strategy {self.rollout_cfg.remasking!r} left masked positions after "
                f"{self.rollout_cfg.steps_per_block} rounds; a strategy must finish its block"
            )
        self.response[:, columns] = torch.where(active[:, None], x, self.response[:, columns])
        return x

    def _end_of_block(self, x: torch.Tensor) -> None:
        """A sequence ends with the block that holds its first EOS (the whole block is decoded)."""
        active = ~self.done
        is_eos = torch.isin(x, self.eos_ids) & active[:, None]  # [b, B]
        has_eos = is_eos.any(dim=1)
        first_eos = is_eos.long().argmax(dim=1)
        block_length = torch.where(has_eos, first_eos + 1, torch.full_like(first_eos, x.shape[1]))
        self.lengths += torch.where(active, block_length, torch.zeros_like(block_length))
        self.done |= has_eos

    def run(self, return_confidences: bool) -> RolloutBatch:
        path = CachedBlockForward if self.rollout_cfg.use_kv_cache else FullBlockForward
        forward = path(
            self.runner, self.prompt_tokens, self.key_valid, self.block_size, self.token_shift
        )
        blocks = 0
        try:
            for block_index in range(self.num_blocks):
                if self.done.all():
                    break
                if self.should_abort is not None and self.should_abort(block_index):
                    raise RolloutAborted(f"rollout aborted before block {block_index}")
                x = self._decode_block(forward, block_index)
                forward.finish_block(x)
                self._end_of_block(x)
                blocks += 1
                if self.stop_rows is not None:
                    width = blocks * self.block_size
                    stop = self.stop_rows(self.response[:, :width], self.lengths)
                    self.done |= stop.to(self.device).bool()
        finally:
            forward.free()
        width = blocks * self.block_size
        return self._rollout_batch(self.prompt_tokens, self.prompt_valid, width, return_confidences)
