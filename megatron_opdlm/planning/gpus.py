"""Named GPUs: memory as `nvidia-smi` reports it, and the peak rates the step-time model uses.

Rates are vendor datasheet numbers (dense, no sparsity); the step-time model multiplies them by
stated efficiencies (`search.Efficiency`), so only their ratios between GPUs matter for ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int  # total device memory (nvidia-smi "Total")
    bf16_tflops: float  # dense BF16 tensor-core peak
    fp8_tflops: float  # dense FP8 peak (0: no FP8 tensor cores)
    hbm_gbps: float  # memory bandwidth, GB/s
    intra_node_gbps: float  # per-GPU unidirectional NVLink (or PCIe) bandwidth, GB/s
    inter_node_gbps: float  # per-GPU network bandwidth, GB/s (one 400 Gb/s NIC = 50)


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("h100-80g", 81559 * MIB, 989.0, 1979.0, 3350.0, 450.0, 50.0),
        GPU("h200-141g", 143771 * MIB, 989.0, 1979.0, 4800.0, 450.0, 50.0),
        GPU("a100-80g", 81920 * MIB, 312.0, 0.0, 2039.0, 300.0, 25.0),
        GPU("a100-40g", 40960 * MIB, 312.0, 0.0, 1555.0, 300.0, 25.0),
        GPU("b200-180g", 183359 * MIB, 2250.0, 4500.0, 8000.0, 900.0, 50.0),
        GPU("l40s-48g", 46068 * MIB, 362.0, 733.0, 864.0, 32.0, 25.0),
    )
}


def gpu_by_name(name: str) -> GPU:
    """A named GPU; ValueError naming the known ones."""
    key = name.strip().lower()
    if key not in GPUS:
        raise ValueError(
            f"unknown GPU {name!r}; known: {', '.join(GPUS)} (or give --gpu-memory-gb)"
        )
    return GPUS[key]


def custom_gpu(memory_gb: float, like: str = "h100-80g") -> GPU:
    """A GPU with `memory_gb` GB (10^9 bytes) and the rates of `like`."""
    if memory_gb <= 0:
        raise ValueError(f"--gpu-memory-gb={memory_gb} must be positive")
    base = gpu_by_name(like)
    return GPU(
        f"{memory_gb:g}GB ({base.name} rates)",
        int(memory_gb * 1e9),
        base.bf16_tflops,
        base.fp8_tflops,
        base.hbm_gbps,
        base.intra_node_gbps,
        base.inter_node_gbps,
    )
