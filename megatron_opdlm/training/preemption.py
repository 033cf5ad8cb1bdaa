"""Stop points inside a rollout step, and the exit codes a launcher reads.

A stop is requested by SIGTERM / SIGUSR1 or the deadline (resilience.StopRequest), or by a file
named STOP in train.run_dir (the user ends a self-requeueing chain). It is honoured at the first
of these points, every rank deciding the same:
- before each block of a rollout (the sampler's `should_abort`, agreed over the model-parallel
  group, whose ranks decode the same blocks); the partial rollout is dropped and the trainer
  goes back to the state before the rollout step (prompt order and RNG), so the resumed run
  replays the step exactly;
- right after the rollout (all ranks: data-parallel groups may decode different numbers of
  blocks, so the world agrees only here) and between the optimizer steps of a rollout step (the
  rollout batch is then saved with the checkpoint and the resumed run continues it);
- at the end of a rollout step.

Exit codes (training/cli.py, tools/train.py), what a SLURM recipe branches on:
    0  EXIT_FINISHED  all steps ran, or a STOP file ended the run: do not requeue
    1                 non-finite value under nan_policy=stop
    2                 bad input, nothing ran
    3  EXIT_RESUME    stopped by a signal or the deadline after saving: requeue, it resumes
(16 and 17 are taken by Megatron's rerun state machine, 124/137 by timeout/SIGKILL.)
"""

from __future__ import annotations

import time
from pathlib import Path

from megatron_opdlm.runtime import collectives
from megatron_opdlm.training.resilience import StopRequest

EXIT_FINISHED = 0
EXIT_RESUME = 3
STOP_FILE = "STOP"


class StopPoints:
    """Agreement on a stop request at the trainer's stop points (every call is collective)."""

    def __init__(self, stop: StopRequest, run_dir: str | Path):
        self.stop = stop
        self.stop_file = Path(run_dir) / STOP_FILE
        self.reason: str | None = None
        self.resumable = True  # False when the STOP file asked for the end of the chain
        self._block_start: float | None = None
        self._block_seconds = 0.0

    def _local_flags(self, unit_seconds: float, save_seconds: float) -> list[int]:
        # One rank looks at the (possibly shared, slow) file system; the reduction spreads it.
        stop_file = collectives.group_rank() == 0 and self.stop_file.exists()
        deadline = self.stop.deadline_near(unit_seconds, save_seconds)
        return [int(self.stop.signal_name is not None), int(deadline), int(stop_file)]

    def agree(
        self, unit_seconds: float, save_seconds: float, group=None, extra: bool = False
    ) -> bool:
        """True on every rank of `group` (default: all) when a stop is requested on any.

        `unit_seconds`: the length of the work before the next stop point (the deadline keeps
        1.5 x that plus the last save free); `extra`: a local reason found elsewhere (an
        aborted rollout), reported as a signal.
        """
        flags = [*self._local_flags(unit_seconds, save_seconds), int(extra)]
        signalled, deadline, stop_file, other = collectives.all_reduce_values(flags, "max", group)
        if not (signalled or deadline or stop_file or other):
            return False
        if stop_file:
            self.reason, self.resumable = f"STOP file {self.stop_file}", False
        elif signalled:
            self.reason = f"signal {self.stop.signal_name or 'on another rank'}"
        elif deadline:
            self.reason = f"deadline of {self.stop.deadline / 60:.1f} min"
        else:
            self.reason = "stop agreed during the rollout"
        return True

    def rollout_abort_check(self, save_seconds: float, group):
        """The sampler's should_abort for one rollout: agreed over `group` before each block."""
        self._block_start = None

        def should_abort(block_index: int) -> bool:  # noqa: ARG001 (AbortCheck signature)
            now = time.perf_counter()
            if self._block_start is not None:
                self._block_seconds = now - self._block_start
            self._block_start = now
            return self.agree(self._block_seconds, save_seconds, group)

        return should_abort

    def seconds_since_signal(self) -> float | None:
        if self.stop.signal_time is None:
            return None
        return time.monotonic() - self.stop.signal_time
