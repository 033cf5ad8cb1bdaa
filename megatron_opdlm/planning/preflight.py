"""Preflight of `tools/train.py`: plan the job's layout before any model is built.

Decision: runs when train.preflight is true (the default) and there is a GPU to plan against:
this machine's GPU (its total memory, H100 rates for the step-time ranking), or the named
`train.preflight_gpu`. On a CPU without `train.preflight_gpu` it is skipped (logged): the tiny
CPU jobs have no device memory to run out of. A layout predicted not to fit stops the job
(exit 2, nothing built) with the plan table, the per-phase breakdown and the best fitting
alternatives at the same GPU count; `--skip-preflight` / `train.preflight=false` overrides.
Every rank computes the same plan (deterministic, no communication), rank 0 logs it.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from megatron_opdlm.config import JobConfig
from megatron_opdlm.planning import report
from megatron_opdlm.planning.gpus import GPU, custom_gpu, gpu_by_name
from megatron_opdlm.planning.inputs import adopt_teacher_architecture, request_from_job
from megatron_opdlm.planning.search import Efficiency, evaluate, search
from megatron_opdlm.runtime.logging import get_logger

log = get_logger(__name__)
ALTERNATIVES = 5


def _local_gpu() -> GPU:
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return custom_gpu(total / 1e9)


def _gpus_per_node(world: int) -> int:
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]
        if value.isdigit():
            return int(value)
    return torch.cuda.device_count() if torch.cuda.is_available() else min(world, 8)


def preflight(job: JobConfig) -> bool:
    """True when training may go on (fits, skipped, or overridden); False: stop, logged."""
    if not job.train.preflight:
        log.info("preflight: off (train.preflight=false)")
        return True
    if job.train.preflight_gpu is not None:
        try:
            gpu = gpu_by_name(job.train.preflight_gpu)
        except ValueError as exc:
            log.error("train.preflight_gpu: %s", exc)
            return False
    elif torch.cuda.is_available():
        gpu = _local_gpu()
    else:
        log.info("preflight: skipped on a CPU (set train.preflight_gpu to plan for a GPU)")
        return True
    world = dist.get_world_size() if dist.is_initialized() else 1
    job = copy.deepcopy(job)  # the trainer adopts the teacher's architecture itself, later
    try:
        adopt_teacher_architecture(job)
    except ValueError as exc:  # the trainer reports a bad teacher checkpoint
        log.info("preflight: skipped (%s)", exc)
        return True
    req = request_from_job(job, world, gpu, _gpus_per_node(world))
    eff = Efficiency()
    candidate = evaluate(req, eff)
    if candidate.error is not None:  # the trainer's own checks report it
        log.info("preflight: skipped (%s)", candidate.error)
        return True
    need = candidate.plan.required_bytes() / 2**30
    have = gpu.memory_bytes / 2**30
    if candidate.fits:
        name, peak = report.layout_name(candidate), candidate.plan.worst.peak_phase
        log.info("preflight: %s needs %.1f GiB of %.1f GiB (peak: %s)", name, need, have, peak)
        return True
    fitting = [c for c in search(req, None, eff) if c.fits][:ALTERNATIVES]
    text = [
        f"preflight: {report.layout_name(candidate)} is predicted NOT to fit: {need:.1f} GiB "
        f"needed of {have:.1f} GiB per GPU",
        report.assumptions(req, eff),
        report.candidates_table([candidate]),
        report.breakdown_table(candidate.plan),
        "best fitting layouts at this GPU count:"
        if fitting
        else "no layout fits at this GPU "
        "count: add GPUs, recompute (precision.recompute=full), or shorter rows",
    ]
    if fitting:
        text.append(report.candidates_table(fitting))
    text.append("override with --skip-preflight (train.preflight=false)")
    log.error("%s", "\n".join(text))
    return False
