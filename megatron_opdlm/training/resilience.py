"""Stopping cleanly: signals, a wall-clock deadline, and non-finite values, agreed by all ranks.

- SIGTERM / SIGUSR1 (SLURM's pre-emption warning, `scancel --signal`) only set a flag in the
  handler. At the end of each rollout step the ranks all-reduce their flags (MAX), so every rank
  takes the same decision: finish the step, save, exit 0. A second signal does not interrupt the
  save (SLURM requeue sends TERM again).
- The deadline asks for a stop when the time left is shorter than 1.5 x the last step plus the
  last save (plus a margin), so the final save ends before the job's time limit.
- Finite checks all-gather one flag per rank, so the error names the step and every rank where a
  value was bad; under `nan_policy=skip` all ranks skip the optimizer step together.
"""

from __future__ import annotations

import signal
import time

import torch

from megatron_opdlm.runtime import collectives
from megatron_opdlm.runtime.logging import get_logger

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteError(RuntimeError):
    """A loss, gradient norm or teacher log-prob was NaN/inf (nan_policy=stop)."""


class StopRequest:
    """Signal flag plus deadline; `should_stop()` is collective (call it on every rank)."""

    def __init__(self, deadline_minutes: float = 0.0, margin_seconds: float = 30.0):
        self.signal_name: str | None = None
        self.signal_time: float | None = None  # time.monotonic() of the first signal
        self.start = time.monotonic()
        self.deadline = deadline_minutes * 60.0 if deadline_minutes > 0 else None
        self.margin = margin_seconds
        self._previous: dict[int, object] = {}
        self.reason: str | None = None

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self.signal_time = time.monotonic()

    def deadline_near(self, last_step_seconds: float, save_seconds: float = 0.0) -> bool:
        if self.deadline is None:
            return False
        elapsed = time.monotonic() - self.start
        needed = 1.5 * last_step_seconds + save_seconds + self.margin
        return elapsed + needed >= self.deadline

    def should_stop(self, last_step_seconds: float, save_seconds: float = 0.0) -> bool:
        """True on every rank when any rank got a signal or the deadline is near."""
        local = [int(self.signal_name is not None),
                 int(self.deadline_near(last_step_seconds, save_seconds))]  # fmt: skip
        signalled, deadline = collectives.all_reduce_values(local, op="max")
        if signalled:
            self.reason = f"signal {self.signal_name or 'on another rank'}"
        elif deadline:
            self.reason = f"deadline of {self.deadline / 60:.1f} min"
        return bool(signalled or deadline)


def ranks_with(flag: bool) -> list[int]:
    """The (global) ranks where `flag` is True (collective: one small all-reduce)."""
    return collectives.ranks_where(flag)


def is_finite(value) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return value is not None and bool(torch.isfinite(torch.tensor(float(value))))


def check_finite(what: str, local_ok: bool, step: int, policy: str) -> bool:
    """Collective: True if `what` is finite on every rank; else raise (stop) or False (skip)."""
    bad = ranks_with(not local_ok)
    if not bad:
        return True
    message = f"non-finite {what} at optimizer step {step} on rank(s) {bad}"
    if policy == "stop":
        raise NonFiniteError(
            f"{message}; stopping without saving over the last checkpoint "
            "(set train.nan_policy=skip to skip such steps instead)"
        )
    log.warning("%s: skipping this optimizer step (train.nan_policy=skip)", message)
    return False
