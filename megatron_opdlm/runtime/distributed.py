"""Distributed start-up from torchrun or SLURM variables, Megatron parallel state, seeding.

The same entry point serves `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT),
`srun` without torchrun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, master = first host of
SLURM_JOB_NODELIST) and a bare `python` (one process). NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import random
import re
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_opdlm.config import ParallelConfig
from megatron_opdlm.runtime import cpu_compat


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list ("gpu[01-03,07],login1") into host names, without scontrol."""
    hosts: list[str] = []
    # split on commas that are not inside brackets
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"(.*?)\[([^\]]+)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0],
            # a port derived from the job id keeps concurrent jobs on one node apart
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            source="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(
    parallel: ParallelConfig, seed: int = 1234, timeout_minutes: float | None = None
) -> LaunchEnv:
    """Start the process group and Megatron's parallel state; seed every generator.

    Idempotent for the process group; parallel state is (re)built each call so tests can switch
    layouts in one process after `shutdown()`.
    """
    cpu_compat.apply()
    launch = read_launch_env()
    on_gpu = torch.cuda.is_available()
    backend = parallel.backend if parallel.backend != "auto" else ("nccl" if on_gpu else "gloo")
    if backend == "nccl" and not on_gpu:
        raise ValueError("parallel.backend=nccl needs CUDA; use gloo (or auto) on a CPU")
    if on_gpu:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        import datetime

        # An explicit address, not MASTER_* in os.environ: a single process must not leak its
        # rendezvous port into the environment of the processes it starts (they would collide).
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(
                minutes=parallel.timeout_minutes if timeout_minutes is None else timeout_minutes
            ),
        )
    model_parallel = parallel.tp * parallel.pp
    if launch.world_size % model_parallel:
        raise ValueError(
            f"world size {launch.world_size} is not divisible by parallel.tp={parallel.tp} x "
            f"parallel.pp={parallel.pp}"
        )
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
    )
    seed_everything(seed)
    return launch


def seed_everything(seed: int) -> None:
    """Seed python/numpy/torch per pipeline stage and data rank, and Megatron's TP RNG tracker.

    Same seed on TP peers (so replicated dropout agrees); Megatron's tracker derives the
    tensor-parallel stream from it.
    """
    from megatron.core import parallel_state, tensor_parallel

    rank_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    rank_seed += 10 * parallel_state.get_data_parallel_rank()
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(rank_seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
