"""The rollout engine's rounds: whole-batch, or pipelined over the PP stages in micro-batches.

Whole-batch (PP=1, or the fallback): a round is one ModelRunner forward of every live slot
through the stages, then the last stage's decisions are broadcast; with PP stages each stage is
busy 1/PP of the round, so a round costs PP x t(b) (t = one stage's cost of b rows).

Pipelined (`rollout.pipeline_microbatches` M >= 2, PP > 1): the S slots are split into M
contiguous ranges (micro-batches) that take turns. Every rank runs the same turns in the same
order; turn m is
  1. wait for micro-batch m's pending decisions and apply them (blocks end, `stop_rows`,
     `should_abort`, slots freed);
  2. prefill queued prompts into m's free slots (a forward that needs no decisions);
  3. the round forward of m's live slots (ModelRunner: receive, forward, send), then the last
     stage decides and `isend`s the decisions [a, B, 3] to every other stage, and every other
     stage posts its `irecv` for them right after its own forward.
Stage 0 therefore forwards micro-batch m + 1 while the later stages still work on m, and with
M >= PP it finds m's decisions waiting when its turn comes back: per round a stage works
M x t(b/M) instead of waiting (PP - 1) x t(b). Posting the receive before the next forward is
what keeps gloo from deadlocking (the last stage sends m's decisions while stage 0 sends m + 1's
hidden states; measured in shared/notes/rollout-engine-probe.md, Pitfall 7).

Decisions are applied in turn m on every stage, the last one included (it keeps its own until
then), so every hook runs at the same point of the same sequence of turns on every rank, and an
abort leaves only communication every rank has already posted: it is drained (waited, not
applied) before `RolloutAborted` propagates, so no stage hangs. Hooks in pipelined mode:
`round_callback` is called once per micro-batch round (its rows); `stop_rows` after the
micro-batch's blocks end; `should_abort(k)` when the furthest block first reaches k, as in
whole-batch rounds. A caller's `should_abort` that agrees over the group (a collective, as the
trainer's) makes stage 0 wait there for the last stage: one micro-batch forward of lost overlap
per new block.

Choice (`rollout.pipeline_microbatches`): 1 = whole-batch; M >= 2 = pipelined on M micro-batches
(at most one per slot); 0 = auto: M = PP, the first rounds run whole-batch, the next ones
pipelined, each stage measuring its busy time (wall minus time in communication, CUDA
synchronised around each communication while calibrating) per round and forwarded batch row
(`per_row_cost`): t(b) and M x t(b/M). The
ideal then says unpipelined = sum over stages of t(b), pipelined = the busiest stage's
M x t(b/M); below `MIN_IDEAL_GAIN` the rest of the rollout runs whole-batch. The stage times
are reduced (max) over the model-parallel group, so every rank takes the same choice. PP=1
never pipelines; several model chunks per rank (VPP) fall back to whole-batch rounds with a log
line (a forward there visits every rank VPP times, so stage 0 cannot move on to the next
micro-batch before the current one has come back to it). Results do not depend on the
choice: every sequence draws from its own random stream and its rows' logits differ only by
fp32 key-width rounding.
"""

from __future__ import annotations

import statistics
import time

import torch
from megatron.core import parallel_state

from megatron_opdlm.runtime import collectives
from megatron_opdlm.runtime.logging import get_logger

# auto: whole-batch and pipelined rounds measured per mode (after one warm-up round each: cache
# allocation, and the pipeline's fill)
CALIBRATION_ROUNDS = 2
# auto pipelines only when the ideal gain covers the pipelined loop's own overhead (its target
# is to stay within 10% of the ideal): a smaller ideal gain could end up slower than whole-batch
MIN_IDEAL_GAIN = 1.1
# tag of the decision messages (gloo matches by tag; NCCL ignores it): apart from hidden states
DECISION_TAG = 7
WHOLE, PIPELINED = "whole-batch", "pipelined"

_log = get_logger(__name__)
_logged: set[str] = set()  # auto's outcomes, logged once per process
# auto's choice per (slots, micro-batches, pp): measured in the first rollout of that shape, then
# reused, so a trainer does not spend calibration rounds in every rollout step. Every rank of a
# model-parallel group decides from the same all-reduced timings, so the caches agree.
_decided: dict[tuple[int, int, int], tuple[str, float]] = {}


def choose_microbatches(requested: int, pp_size: int, num_chunks: int, slots: int):
    """(M, why): the micro-batches a rollout may pipeline over (1 = whole-batch rounds)."""
    if pp_size == 1:
        return 1, "PP=1: whole-batch rounds"
    if requested == 1:
        return 1, "rollout.pipeline_microbatches=1: whole-batch rounds"
    if num_chunks > 1:
        return 1, (
            f"{num_chunks} model chunks per rank (VPP): pipelined rounds need one chunk per "
            "rank; whole-batch rounds"
        )
    microbatches = min(requested or pp_size, slots)
    if microbatches < 2:
        return 1, f"{slots} slot(s): nothing to split; whole-batch rounds"
    source = "auto" if requested == 0 else f"rollout.pipeline_microbatches={requested}"
    return microbatches, f"{source}: {microbatches} micro-batches"


def ideal_gain(whole_busy: list[float], cycle_busy: list[float]) -> float:
    """Unpipelined over pipelined ideal round time from per-stage busy seconds: sum of the
    stages' t(b) over the busiest stage's M x t(b/M)."""
    return sum(whole_busy) / max(max(cycle_busy), 1e-12)


def per_row_cost(busy: list[float], rows: list[int]) -> float:
    """Median seconds per forwarded batch row over calibration rounds. The two modes are measured
    in different rounds of the rollout, whose row counts differ (sequences end; a block's first
    round commits the previous block in extra rows): per row, like is compared with like. Seen
    without it (PP=2, 32 prompts, docs/bench_rollout): an "ideal gain" of 3.0x from whole-batch
    samples taken in commit rounds, where the run's own steady-state ideal was 1.29x."""
    return statistics.median(b / max(r, 1) for b, r in zip(busy, rows, strict=True))


def slot_ranges(slots: int, microbatches: int) -> list[range]:
    """`microbatches` contiguous slot ranges of near-equal size (contiguous: the cache reads a
    view, `slot_cache`)."""
    bounds = [len(chunk) for chunk in torch.arange(slots).tensor_split(microbatches)]
    starts = [sum(bounds[:i]) for i in range(microbatches)]
    return [range(start, start + size) for start, size in zip(starts, bounds, strict=True)]


class _Pipeline:
    """Pipelined turns over the engine's micro-batches (module docstring)."""

    def __init__(self, engine, microbatches: int):
        self.engine, self.runner = engine, engine.runner
        self.ranges = slot_ranges(engine.num_slots, microbatches)
        group = self.runner.pp_group
        self.group, self.last_rank = group, self.runner.last_stage_rank
        self.others = [r for r in collectives.group_ranks(group) if r != self.last_rank]
        self.pending = {}  # micro-batch -> (round work, decisions [a, B, 3], comm handles)

    def cycle(self) -> tuple[float | None, bool]:
        """One turn per micro-batch: (this stage's busy seconds in rounds, None when no round
        started; whether anything is left)."""
        busy, started = 0.0, False
        for index, slots in enumerate(self.ranges):
            busy += self._timed(self._apply_pending, index)
            self._guarded(self.engine._admit, slots)
            live = self.engine.live_slots(slots)
            if live.numel():
                busy += self._timed(self._start_round, index, live)
                started = True
        return (busy if started else None), bool(self.pending)

    def drain(self) -> None:
        """Apply every pending decision (turn order); afterwards nothing is in flight."""
        for index in range(len(self.ranges)):
            self._guarded(self._apply_pending, index)

    def _timed(self, function, *args) -> float:
        """Run function(*args); its wall seconds minus the time spent in communication."""
        start, waited = time.perf_counter(), self.runner.wait_seconds
        self._guarded(function, *args)
        return time.perf_counter() - start - (self.runner.wait_seconds - waited)

    def _guarded(self, function, *args):
        try:
            return function(*args)
        except BaseException:  # an abort (or a strategy error) is raised at the same turn on
            self._abandon()  # every rank: finish what was posted, so no stage waits forever
            raise

    def _start_round(self, index: int, live: torch.Tensor) -> None:
        engine = self.engine
        work = engine._round_forward(live)
        if self.runner.is_last_stage:
            decision = engine._round_decision(work)  # [a, B, 3]
            handles = [
                collectives.isend_tensor(decision, rank, self.group, DECISION_TAG)
                for rank in self.others
            ]
        else:  # posted before the next forward (gloo deadlocks otherwise, module docstring)
            decision = engine.empty_decision(live.numel())
            handles = [collectives.irecv_tensor(decision, self.last_rank, self.group, DECISION_TAG)]
        self.pending[index] = (work, decision, handles)

    def _apply_pending(self, index: int) -> None:
        if index not in self.pending:
            return
        work, decision, handles = self.pending.pop(index)
        self._wait(handles)
        self.engine._apply(work.live, decision, work.masked)

    def _wait(self, handles) -> None:
        start = self.runner.communication_start()
        for handle in handles:
            handle.wait()
        self.runner.communication_end(start)  # counted in runner.wait_seconds

    def _abandon(self) -> None:
        pending, self.pending = self.pending, {}
        for _, _, handles in pending.values():
            self._wait(handles)


class RoundScheduler:
    """Runs the engine's rounds to the end, whole-batch or pipelined (module docstring)."""

    def __init__(self, engine, requested: int):
        runner = engine.runner
        self.engine, self.runner = engine, runner
        self.microbatches, self.reason = choose_microbatches(
            requested, runner.pp_size, len(runner.chunks), engine.num_slots
        )
        if runner.pp_size > 1 and len(runner.chunks) > 1 and requested != 1:
            _log.info("rollout: %s", self.reason)
        self.auto = requested == 0 and self.microbatches > 1
        runner.sync_timing = self.auto and engine.device.type == "cuda"  # while calibrating
        self.mode = PIPELINED if self.microbatches > 1 and not self.auto else WHOLE
        self.pipeline = _Pipeline(engine, self.microbatches) if self.microbatches > 1 else None
        # per batch round (a whole-batch round, or a pipelined cycle: every micro-batch's turn)
        self.wall = {WHOLE: [], PIPELINED: []}  # wall seconds, prefills included
        self.busy = {WHOLE: [], PIPELINED: []}  # this stage's seconds in rounds, waits excluded
        self.rows = {WHOLE: [], PIPELINED: []}  # batch rows forwarded in those rounds
        self.gain: float | None = None  # auto's ideal gain, once measured
        self.shape = (engine.num_slots, self.microbatches, runner.pp_size)
        if self.auto and self.shape in _decided:
            self.auto = runner.sync_timing = False
            self.mode, self.gain = _decided[self.shape]
            self.reason = f"auto: {self.mode} rounds (decided earlier, ideal gain {self.gain:.2f}x)"

    def run(self) -> None:
        while self._whole_batch_round() if self.mode == WHOLE else self._cycle():
            if self.auto:
                self._calibrate()

    def stats(self) -> dict:
        """Counts for `generate_rollout(stats=...)`."""
        return {
            "batch_rounds": len(self.wall[WHOLE]) + len(self.wall[PIPELINED]),
            "pipeline_microbatches": self.microbatches if self.mode == PIPELINED else 1,
            "pipeline_reason": self.reason,
            "pipeline_ideal_gain": self.gain,
            "round_wall_s": {mode: list(v) for mode, v in self.wall.items()},
            "round_busy_s": {mode: list(v) for mode, v in self.busy.items()},
            "round_rows": {mode: list(v) for mode, v in self.rows.items()},
        }

    def _whole_batch_round(self) -> bool:
        engine = self.engine
        start = time.perf_counter()
        engine._admit()
        live = engine.live_slots(range(engine.num_slots))
        if not live.numel():
            return False
        round_start, waited, rows = time.perf_counter(), self.runner.wait_seconds, engine.round_rows
        engine._round(live)
        end = time.perf_counter()
        self.busy[WHOLE].append(end - round_start - (self.runner.wait_seconds - waited))
        self.rows[WHOLE].append(engine.round_rows - rows)
        self.wall[WHOLE].append(end - start)
        return True

    def _cycle(self) -> bool:
        start, rows = time.perf_counter(), self.engine.round_rows
        busy, more = self.pipeline.cycle()
        if busy is not None:  # a cycle that ran rounds (the last may only apply decisions)
            self.busy[PIPELINED].append(busy)
            self.rows[PIPELINED].append(self.engine.round_rows - rows)
            self.wall[PIPELINED].append(time.perf_counter() - start)
        return more

    def _calibrate(self) -> None:
        measured = {mode: len(values) for mode, values in self.busy.items()}
        if self.mode == WHOLE and measured[WHOLE] > CALIBRATION_ROUNDS:
            self.mode = PIPELINED
        elif self.mode == PIPELINED and measured[PIPELINED] > CALIBRATION_ROUNDS:
            self.auto = self.runner.sync_timing = False
            self.pipeline.drain()  # nothing in flight while the ranks agree
            pp, stage = self.runner.pp_size, self.runner.pp_rank
            values = [0.0] * (2 * pp)  # [t(b) per stage, M x t(b/M) per stage], per row
            values[stage] = per_row_cost(self.busy[WHOLE][1:], self.rows[WHOLE][1:])
            values[pp + stage] = per_row_cost(self.busy[PIPELINED][1:], self.rows[PIPELINED][1:])
            values = collectives.all_reduce_values(
                values, op="max", group=parallel_state.get_model_parallel_group()
            )  # the slowest TP rank of each stage; the same numbers on every rank
            self.gain = ideal_gain(values[:pp], values[pp:])
            if self.gain < MIN_IDEAL_GAIN:
                self.mode = WHOLE
            _decided[self.shape] = (self.mode, self.gain)
            self.reason = (
                f"auto: {self.mode} rounds (ideal gain of {self.microbatches} micro-batches "
                f"{self.gain:.2f}x, pipelined from {MIN_IDEAL_GAIN}x)"
            )
            if self.mode not in _logged:
                _logged.add(self.mode)
                _log.info("rollout: %s", self.reason)
