"""The rollout engine: per-sequence block progress and continuous batching over S slots.

    batch = generate_rollout(student_chunks, prompts, model_cfg, diffusion_cfg, rollout_cfg,
                             max_new_tokens=256, slots=32, generator=generator)

Same decoding as `diffusion.sampler` (rounds, proposals, remasking, EOS / cap rule, step map,
RolloutBatch layout), but the rollout is scheduled per sequence instead of in lock step:
- per-sequence progress: every live sequence is in its own block and round; one forward serves
  rows at different blocks and rounds; a sequence whose block is finished commits it in its next
  forward (a "fused commit" as two batch rows on one slot: the finished block at its columns, the
  new block after it, so every forward stays [rows, B]) without waiting for the others;
- continuous batching: the N prompts run on S slots (`slots`; 0 or >= N: one slot each, today's
  memory); a sequence that ends (EOS block done, length cap, `stop_rows`) leaves its slot and the
  next queued prompt is prefilled into it. The KV cache (`slot_cache.SlotCache`) holds S slots;
- results independent of batching: every sequence draws its sampling uniforms from its own
  counter-based stream (run seed, sequence key, block, round, position; `sequence_uniform`), so
  its tokens and step map are the same whatever S, the prompt order or the parallel layout; with
  greedy decoding they equal the lock-step sampler's (the logits differ by fp32 rounding only:
  the key width of a forward changes the summation order).
A sequence's key is its prompt (content hash) and its occurrence among equal prompts, so a
permutation of the prompts gives each sequence its own tokens back.

Parallelism as in the sampler: every rank of a model-parallel group (TP x PP) passes the same
prompts and runs the same schedule (it depends only on decisions, which the last pipeline stage
sends to the others); data-parallel ranks pass their own. With PP the rounds are either
whole-batch (one pass of every live slot through the stages, ModelRunner's P2P, then a
broadcast of the decisions) or pipelined: the slots are split into micro-batches that take
turns, so stages work on different micro-batches at once and the last stage's decisions for one
micro-batch travel back while the others are forwarded (`engine_pipeline`; chosen by
`rollout.pipeline_microbatches`, auto = measured on the first rounds, whole-batch where the ideal
says no gain, with VPP and at PP=1).

Hooks (the sampler's meaning): `should_abort(block_index) -> bool` is asked each time the
rollout's furthest block advances (before any sequence starts block k); True raises
`RolloutAborted` (on every rank; pipelined rounds first finish the messages already posted).
`stop_rows(response [b, w], lengths [b]) -> [b] bool` is asked for the sequences that just
committed a block (their responses so far, right-padded); True ends them after that block.
`round_callback` (engine_rows.RowRoundCallback) runs on the last stage after each round's
decisions; pipelined, once per micro-batch round (that micro-batch's rows).

Falls back to the lock-step sampler (same arguments) for the no-cache path
(`rollout.use_kv_cache=false`), in lock-step batches of `slots` prompts (joined into one
RolloutBatch), so `slots` bounds the rows decoded at once on every path. The masks of a cached
forward are dense ([rows, 1, B, end] per round, [a, 1, P, P] per prefill); a FlexAttention core
(which otherwise takes column descriptors) runs them as SDPA (`slot_cache.slot_core_attention`).
Each layer supported by `lean_layer` runs its lean forward (megatron's computation, without the
module tree).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import torch

from megatron_opdlm.config import DiffusionConfig, ModelConfig, RolloutConfig
from megatron_opdlm.diffusion import sampler
from megatron_opdlm.diffusion.engine_pipeline import RoundScheduler
from megatron_opdlm.diffusion.engine_rows import (
    RowRoundCallback,
    per_row_projection,
    prefill_mask,
    round_mask,
    sequence_keys,
    sequence_uniform,
)
from megatron_opdlm.diffusion.lean_layer import lean_layers
from megatron_opdlm.diffusion.model_runner import ModelRunner, decoding_mode
from megatron_opdlm.diffusion.rollout_types import RolloutBatch, RolloutResults, concat_batches
from megatron_opdlm.diffusion.sampling import propose_tokens
from megatron_opdlm.diffusion.slot_cache import SlotCache, slot_attention
from megatron_opdlm.models.projection import project_rows_gathered
from megatron_opdlm.models.vocab import mask_invalid_logits

# One exception for both decoders: the trainer catches it whichever one ran.
RolloutAborted = sampler.RolloutAborted


@torch.no_grad()
def generate_rollout(
    model_chunks: list[torch.nn.Module],
    prompts: list[list[int]],
    model_cfg: ModelConfig,
    diffusion_cfg: DiffusionConfig,
    rollout_cfg: RolloutConfig,
    max_new_tokens: int,
    slots: int = 0,
    generator: torch.Generator | None = None,
    return_confidences: bool = False,
    round_callback: RowRoundCallback | None = None,
    should_abort: Callable[[int], bool] | None = None,
    stop_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    stats: dict | None = None,
) -> RolloutBatch:
    """Decode `prompts` (this data-parallel rank's) on `slots` slots (0: one per prompt).

    `stats`, when given, receives this rank's counts: slots, forwards (rounds + prefill
    forwards), prefills, rounds (decision steps: pipelined, one per micro-batch round),
    kv_cache_bytes (peak K/V bytes of this rank's layers), and the scheduler's: batch_rounds
    (rounds of all slots: whole-batch rounds + pipelined cycles), pipeline_microbatches (1 =
    whole-batch rounds at the end), pipeline_reason, pipeline_ideal_gain (auto's measurement or
    None), round_wall_s / round_busy_s (per batch round and mode: wall seconds; this stage's
    seconds outside communication, prefills excluded), round_rows (per batch round and mode: batch
    rows forwarded)."""
    strategy = sampler.validate_request(
        prompts, model_cfg, diffusion_cfg, rollout_cfg, max_new_tokens
    )
    if slots < 0:
        raise ValueError(f"rollout slots={slots} must be >= 0 (0 = one slot per prompt)")
    if not rollout_cfg.use_kv_cache:
        hooks = {"should_abort": should_abort, "stop_rows": stop_rows}
        # lock-step batches of `slots` prompts: slots bound the rows decoded at once here too
        size = slots if 0 < slots < len(prompts) else len(prompts)
        batches = [
            sampler.generate(
                model_chunks, prompts[start : start + size], model_cfg, diffusion_cfg,
                rollout_cfg, max_new_tokens, generator=generator,
                return_confidences=return_confidences,
                **{name: hook for name, hook in hooks.items() if hook is not None},
            )
            for start in range(0, len(prompts), size)
        ]  # fmt: skip
        return batches[0] if len(batches) == 1 else concat_batches(batches, model_cfg.pad_token_id)
    device = sampler._model_device(model_chunks)
    sampler._check_same_prompts(prompts, device)
    seed = 0
    if rollout_cfg.temperature > 0:  # one draw on every rank: generators stay in step
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    engine = _Engine(
        ModelRunner(model_chunks), prompts, model_cfg, diffusion_cfg, rollout_cfg,
        max_new_tokens, slots or len(prompts), strategy, seed, device,
    )  # fmt: skip
    engine.callback, engine.should_abort, engine.stop_rows = round_callback, should_abort, stop_rows
    with decoding_mode(model_chunks), slot_attention(model_chunks), lean_layers(model_chunks):
        batch = engine.run(return_confidences)
    if stats is not None:
        stats.update(
            slots=engine.num_slots, forwards=engine.forwards, prefills=engine.prefills,
            rounds=engine.rounds, kv_cache_bytes=engine.cache_bytes,
            **engine.scheduler.stats(),
        )  # fmt: skip
    return batch


class _RoundWork(NamedTuple):
    """A round's forward, kept until its decisions are made (and, pipelined, applied)."""

    live: torch.Tensor  # [a] slots of the round
    masked: torch.Tensor  # [a, B] positions still masked before the round
    logits: torch.Tensor | None  # [rows, B, V] on the last stage (commit rows first), else None
    commit_slots: torch.Tensor  # [c] slots whose finished block the forward committed
    need_block: torch.Tensor  # [a] bool, rows that ran their block in the forward


class _Engine(RolloutResults):
    """Sequences [N] (results) and slots [S] (what is being decoded now)."""

    def __init__(
        self, runner, prompts, model_cfg, diffusion_cfg, rollout_cfg, max_new_tokens, slots,
        strategy, seed, device,
    ):  # fmt: skip
        self.runner, self.prompts, self.strategy, self.seed = runner, prompts, strategy, seed
        self.model_cfg, self.rollout_cfg, self.device = model_cfg, rollout_cfg, device
        self.block_size, self.token_shift = diffusion_cfg.block_size, diffusion_cfg.token_shift
        self.num_blocks = max_new_tokens // self.block_size
        n, bs = len(prompts), self.block_size
        self.num_slots = min(slots, n)
        self.keys = torch.tensor(sequence_keys(prompts), dtype=torch.long)  # [N]
        super().__init__(n, max_new_tokens, model_cfg, device)  # [N, R] results
        self.blocks_decoded = [0] * n
        self.eos_ids = torch.tensor(model_cfg.eos_token_ids, dtype=torch.long, device=device)
        s = self.num_slots
        self.sequence = [-1] * s  # slot -> sequence index (-1: free)
        self.block = torch.zeros(s, dtype=torch.long)  # block index of each slot's sequence
        self.round = torch.zeros(s, dtype=torch.long)  # round within that block
        self.committed = torch.zeros(s, dtype=torch.long)  # cache columns committed
        self.pending = torch.zeros(s, dtype=torch.bool)  # finished block not yet in the cache
        self.x = torch.full((s, bs), model_cfg.student_mask_token_id, device=device)  # [S, B]
        self.masked = torch.zeros(s, bs, dtype=torch.bool, device=device)  # [S, B]
        self.carry: torch.Tensor | None = None  # [S, V] logits of the last committed token
        longest = max(len(p) for p in prompts)
        self.cache = SlotCache(s, longest + max_new_tokens, device)
        self.queue = deque(range(n))
        self.furthest = -1  # furthest block any sequence has started
        self.callback = self.should_abort = self.stop_rows = None
        self.scheduler: RoundScheduler | None = None
        self.forwards = self.prefills = self.rounds = 0  # model forwards, for the benchmark
        self.round_rows = 0  # batch rows forwarded in rounds (auto's per-row calibration)
        self.cache_bytes = 0  # peak K/V bytes of this rank

    # -- scheduling (the loop itself: engine_pipeline.RoundScheduler) -------------------------
    def run(self, return_confidences: bool) -> RolloutBatch:
        try:
            self.scheduler = RoundScheduler(self, self.rollout_cfg.pipeline_microbatches)
            self.scheduler.run()
        finally:
            self.cache_bytes = self.cache.memory_bytes()
            self.cache.free()
        return self._batch(return_confidences)

    def _starting_block(self, block: int) -> None:
        if block > self.furthest:
            self.furthest = block
            if self.should_abort is not None and self.should_abort(block):
                raise RolloutAborted(f"rollout aborted before block {block}")

    def live_slots(self, candidates: range) -> torch.Tensor:
        """[a] long: the slots of `candidates` that hold a sequence."""
        return torch.tensor([s for s in candidates if self.sequence[s] >= 0], dtype=torch.long)

    def _admit(self, candidates: range | None = None) -> None:
        """Prefill queued prompts into the free slots of `candidates` (default all): one forward."""
        candidates = range(self.num_slots) if candidates is None else candidates
        free = [s for s in candidates if self.sequence[s] < 0]
        admitted = free[: len(self.queue)]
        if not admitted:
            return
        self._starting_block(0)
        self.prefills += 1
        mask_id = self.model_cfg.student_mask_token_id
        for slot in admitted:
            self.sequence[slot] = self.queue.popleft()
        slots = torch.tensor(admitted, dtype=torch.long)
        lengths = torch.tensor([len(self.prompts[self.sequence[s]]) for s in admitted])
        width = int(lengths.max())
        tokens = torch.full((len(admitted), width), self.model_cfg.pad_token_id, dtype=torch.long)
        for row, slot in enumerate(admitted):  # right-padded; pad queries write past the end
            tokens[row, : lengths[row]] = torch.tensor(self.prompts[self.sequence[slot]])
        self.block[slots], self.round[slots], self.pending[slots] = 0, 0, False
        self.committed[slots] = lengths
        self.x[slots.to(self.device)] = mask_id
        self.masked[slots.to(self.device)] = True
        self.cache.plan(slots, torch.zeros_like(slots))
        mask = prefill_mask(lengths, width, self.block_size).to(self.device)  # [a, 1, P, P]
        if self.token_shift:  # the last prompt token's logits predict block position 0
            rows, processor = (lengths - 1)[:, None].to(self.device), per_row_projection
        else:
            rows = torch.zeros(0, dtype=torch.long, device=self.device)
            processor = project_rows_gathered
        logits = self._forward(tokens.to(self.device), 0, mask, rows, processor)
        if self.token_shift and logits is not None:
            self._set_carry(slots, logits[:, 0])

    def _set_carry(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Last stage: carry[slots] = values [k, V] (allocated at the first write)."""
        if self.carry is None:
            self.carry = values.new_zeros(self.num_slots, values.shape[-1])  # [S, V]
        self.carry[slots.to(self.device)] = values

    def _forward(self, tokens, starts, mask, rows, processor=project_rows_gathered):
        """One model forward on the plan's slots; logits [b, n, V] on the last stage."""
        b, n = tokens.shape
        starts = starts if isinstance(starts, torch.Tensor) else torch.full((b,), starts)
        positions = starts.to(self.device)[:, None] + torch.arange(n, device=self.device)
        self.forwards += 1
        logits = self.runner.forward(tokens, positions, mask, rows, self.cache, processor)
        self.cache_bytes = max(self.cache_bytes, self.cache.memory_bytes())
        return logits

    # -- one round --------------------------------------------------------------------------
    def _round(self, live: torch.Tensor) -> None:
        """A whole-batch round: one forward for `live` (commits included), the last stage's
        decisions broadcast, applied on every rank."""
        work = self._round_forward(live)
        if self.runner.is_last_stage:
            decision = self._round_decision(work)
        else:
            decision = self.empty_decision(live.numel())
        decision = self.runner.broadcast_from_last_stage(decision)
        self._apply(live, decision, work.masked)

    def empty_decision(self, rows: int) -> torch.Tensor:
        """[rows, B, 3] float64: the buffer the last stage's decisions arrive in."""
        return torch.empty(rows, self.block_size, 3, dtype=torch.float64, device=self.device)

    def _round_forward(self, live: torch.Tensor) -> _RoundWork:
        """Every rank: the round's forward for `live` (finished blocks committed in it)."""
        bs, dev = self.block_size, self.device
        self.rounds += 1
        masked = self.masked[live.to(dev)]  # [a, B]
        if self.token_shift:  # position 0 reads the carry: only positions 1.. need the block
            need_block = masked[:, 1:].any(dim=1).cpu()
        else:
            need_block = torch.ones(live.numel(), dtype=torch.bool)
        commit = self.pending[live]  # [a]
        commit_slots, block_slots = live[commit], live[need_block]
        starts = torch.cat(
            [self.committed[commit_slots], self.committed[block_slots] + bs * commit[need_block]]
        )
        slots = torch.cat([commit_slots, block_slots])
        logits = None
        if slots.numel():
            queries = [self._finished_block(int(s)) for s in commit_slots]
            tokens = torch.cat([*(q[None] for q in queries), self.x[block_slots.to(dev)]])
            self.cache.plan(slots, starts)
            self.round_rows += slots.numel()
            rows = torch.arange(bs, device=dev)
            logits = self._forward(tokens, starts, round_mask(starts, bs).to(dev), rows)
            self.committed[commit_slots] += bs
            self.pending[commit_slots] = False
        return _RoundWork(live, masked, logits, commit_slots, need_block)

    def _round_decision(self, work: _RoundWork) -> torch.Tensor:
        """Last stage: [a, B, 3] decisions of the round `work` (before any other is applied)."""
        num_commits = work.commit_slots.numel()
        if self.token_shift and num_commits:  # the finished block's last token
            self._set_carry(work.commit_slots, work.logits[:num_commits, self.block_size - 1])
        block_logits = self._block_logits(work.live, work.logits, num_commits, work.need_block)
        return self._decide(work.live, block_logits, work.masked)

    def _finished_block(self, slot: int) -> torch.Tensor:
        """[B] the tokens of the slot's previous block (to commit)."""
        sequence, block = self.sequence[slot], int(self.block[slot]) - 1
        return self.response[sequence, block * self.block_size : (block + 1) * self.block_size]

    def _block_logits(self, live, logits, num_commits, need_block) -> torch.Tensor:
        """[a, B, V]: row j predicts block position j of each live slot (see block_forward)."""
        if not self.token_shift:
            return logits[num_commits:]
        bs = self.block_size
        out = self.carry[live.to(self.device)][:, None].repeat(1, bs, 1)  # [a, B, V]
        if logits is not None and logits.shape[0] > num_commits:
            out[need_block.to(self.device), 1:] = logits[num_commits:, : bs - 1]
        return out

    def _decide(self, live, logits, masked) -> torch.Tensor:
        """Last stage: [a, B, 3] float64 (token, confidence, select) per live slot."""
        a, bs = masked.shape
        cfg = self.rollout_cfg
        logits = mask_invalid_logits(logits, self.model_cfg)  # [a, B, V]
        sequences = torch.tensor([self.sequence[s] for s in live.tolist()], dtype=torch.long)
        blocks, rounds = self.block[live], self.round[live]
        uniform = None
        if cfg.temperature > 0:
            uniform = sequence_uniform(self.seed, self.keys[sequences], blocks, rounds, bs)
            uniform = uniform.to(self.device).reshape(-1)
        tokens, confidence = propose_tokens(logits.reshape(a * bs, -1), cfg, uniform)
        tokens, confidence = tokens.view(a, bs), confidence.view(a, bs)
        select = torch.zeros_like(masked)
        for round_index in rounds.unique().tolist():  # strategies take one round index
            rows = (rounds == round_index).to(self.device)
            select[rows] = self.strategy(
                confidence[rows], masked[rows], round_index, cfg.steps_per_block, cfg
            )
        if self.callback is not None:
            x = self.x[live.to(self.device)]
            self.callback(sequences, blocks, rounds, logits, x.clone(), masked.clone(), select)
        return torch.stack([tokens.double(), confidence.double(), select.double()], dim=-1)

    def _apply(self, live: torch.Tensor, decision: torch.Tensor, masked: torch.Tensor) -> None:
        """Every rank: unmask the selected positions; finished blocks end or move on."""
        bs, dev = self.block_size, self.device
        live_dev = live.to(dev)
        tokens, confidence = decision[..., 0].long(), decision[..., 1].float()
        select = decision[..., 2].bool() & masked  # [a, B]
        sequences = torch.tensor([self.sequence[s] for s in live.tolist()], device=dev)
        self.num_forwards[sequences] += 1
        x = torch.where(select, tokens, self.x[live_dev])
        self.x[live_dev] = x
        self.masked[live_dev] = masked & ~select
        rows = sequences[:, None].expand(-1, bs)  # [a, B]
        columns = (self.block[live].to(dev) * bs)[:, None] + torch.arange(bs, device=dev)
        step = self.round[live].to(dev)[:, None].expand(-1, bs)
        self.step_map[rows, columns] = torch.where(select, step, self.step_map[rows, columns])
        self.confidence[rows, columns] = torch.where(
            select, confidence, self.confidence[rows, columns]
        )
        self.round[live] += 1
        left = self.masked[live_dev].any(dim=1).cpu()  # [a]
        if bool((left & (self.round[live] >= self.rollout_cfg.steps_per_block)).any()):
            raise RuntimeError(
                f"remasking strategy {self.rollout_cfg.remasking!r} left masked positions after "
                f"{self.rollout_cfg.steps_per_block} rounds; a strategy must finish its block"
            )
        finished = live[~left]
        if finished.numel():
            self._end_of_block(finished, x[~left.to(dev)], columns[~left.to(dev)])

    def _end_of_block(self, slots, x, columns) -> None:
        """Sequences of `slots` finished their block x [k, B]: EOS / cap / stop_rows, or next."""
        sequences = torch.tensor([self.sequence[s] for s in slots.tolist()], device=self.device)
        self.response[sequences[:, None].expand_as(columns), columns] = x
        is_eos = torch.isin(x, self.eos_ids)  # [k, B]
        has_eos = is_eos.any(dim=1)
        first_eos = is_eos.long().argmax(dim=1)
        self.lengths[sequences] += torch.where(has_eos, first_eos + 1, self.block_size)
        blocks = self.block[slots] + 1
        for sequence, count in zip(sequences.tolist(), blocks.tolist(), strict=True):
            self.blocks_decoded[sequence] = count
        done = has_eos.cpu() | (blocks >= self.num_blocks)
        if self.stop_rows is not None and not bool(done.all()):
            going = ~done
            width = int(blocks[going].max()) * self.block_size
            stop = self.stop_rows(
                self.response[sequences[going.to(self.device)], :width].clone(),
                self.lengths[sequences[going.to(self.device)]].clone(),
            )
            done[going] = stop.to("cpu", torch.bool)
        for slot, ended in zip(slots.tolist(), done.tolist(), strict=True):
            if ended:
                self.sequence[slot] = -1
        going = slots[~done]
        if going.numel():
            self._starting_block(int(self.block[going].max()) + 1)
            self.block[going] += 1
            self.round[going] = 0
            self.pending[going] = True
            self.x[going.to(self.device)] = self.model_cfg.student_mask_token_id
            self.masked[going.to(self.device)] = True

    # -- result -----------------------------------------------------------------------------
    def _batch(self, return_confidences: bool) -> RolloutBatch:
        prompt_tokens, prompt_valid = sampler.left_pad(
            self.prompts, self.model_cfg.pad_token_id, self.device
        )
        width = max(self.blocks_decoded) * self.block_size
        return self._rollout_batch(prompt_tokens, prompt_valid, width, return_confidences)
