"""Step metrics: reduction to one set of numbers, the console line and TensorBoard scalars."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch
from megatron.core import parallel_state

from megatron_opdlm.distill.loss import metric_keys, metric_totals, summarize_totals
from megatron_opdlm.runtime import collectives
from megatron_opdlm.runtime.logging import get_logger

log = get_logger("training")


def contributes_metrics() -> bool:
    """One rank per data-parallel replica holds the loss: last pipeline stage, TP rank 0."""
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def reduce_loss_metrics(
    metric_dicts: list[dict[str, torch.Tensor]], with_teacher: bool
) -> dict[str, float]:
    """Means over micro-batches and DP replicas, the same on every rank (collective).

    One all-reduce of the summed metrics (a float64 vector, `distill.loss.metric_keys`) over the
    world: the ranks that hold a loss (`contributes_metrics`, one per DP replica) add theirs,
    the others add zeros. The world rather than the DP group, because rank 0 (which logs) sits on
    the first pipeline stage and the loss on the last. `with_teacher`: the job has teacher
    targets (every mode but mdlm_sft), which adds the teacher-entropy key.
    """
    keys = metric_keys(with_teacher)
    local = [0.0] * (len(keys) + 1)  # the summed metrics, then 1 per contributing rank
    if contributes_metrics() and metric_dicts:
        local = metric_totals(metric_dicts, keys) + [1.0]
    *totals, contributors = collectives.all_reduce_values(local, op="sum")
    if not contributors:
        return {}  # no rank had a micro-batch with a loss
    return summarize_totals(dict(zip(keys, totals)))


def memory_gib() -> float:
    """Peak GPU memory allocated, or the process's peak resident set on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class StepLogger:
    """Rank-0 console line, TensorBoard scalars and run_dir/metrics.jsonl (one record per step).

    metrics.jsonl is appended to (a resumed run continues it); floats are written with full
    precision, so two runs can be compared exactly.
    """

    def __init__(self, run_dir: str, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def record(self, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"kind": kind, **values}) + "\n")

    def truncate(self, optimizer_step: int, rollout_step: int) -> None:
        """On resume: drop records of steps after the checkpoint (work that was lost)."""
        if not self.enabled or not self.jsonl.is_file():
            return
        kept = []
        for line in self.jsonl.read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "train" and record.get("step", 0) > optimizer_step:
                continue
            if record.get("kind") == "eval" and record.get("rollout_step", 0) > rollout_step:
                continue
            kept.append(line)
        tmp = self.jsonl.with_name(self.jsonl.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.jsonl)

    def step_line(self, values: dict[str, float], step: int, total: int) -> None:
        if not self.enabled:
            return
        times = values
        log.info(
            "step %d/%d | rollout %d | loss %.4f | kl %.4f | lr %.2e | grad norm %.3f | "
            "rollout tokens %d | tokens/s %.1f | time rollout %.2fs teacher+student %.2fs "
            "optim %.2fs | mem %.2f GiB%s",
            step, total, values["rollout_step"], values.get("loss", float("nan")),
            values.get("divergence", float("nan")), values["lr"], values["grad_norm"],
            values["rollout_tokens"], values["tokens_per_second"], times["time_rollout"],
            times["time_forward_backward"], times["time_optimizer"],
            values["memory_gib"], " | SKIPPED" if values.get("skipped") else "",
        )  # fmt: skip

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
