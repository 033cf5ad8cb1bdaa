"""Exact parameter, gradient-buffer and optimizer-shard sizes per rank, by building the real models.

No formula for parameters: for every (TP rank, PP stage, VPP chunk) of a layout we build the
teacher and student chunks with the project's own builder (`models.builder._build_chunk`, the
same specs, vocabulary padding, tied embeddings, QK-norm, GQA) on the meta device, in one
process, and count the tensors. Gradient-buffer and distributed-optimizer shard sizes come from
Megatron's own layout code (`DistributedOptimizer.compute_full_param_layout`: 64-element param
alignment, bucket ends padded to lcm(DP, 128)) applied to those meta parameters.

How one process builds another rank's modules (`fake_layout`): Megatron-Core asks
`parallel_state` for sizes and ranks, and its modules read `group.size()` / `group.rank()` of the
process groups in their `pg_collection` (and only when `torch.distributed.is_initialized()`).
We start a one-process gloo world when none exists (destroyed again afterwards), then swap
`parallel_state`'s module globals for the duration of the build: every process-group global
becomes a `FakeGroup(size, rank)` with the layout's sizes and the rank being built, and the
`_MPU_*` size/rank overrides (the setters Megatron's own tests use) are set. Nothing
communicates while building on the meta device (`init_model_with_meta_device` skips the
tied-embedding all-reduce; `perform_initialization=False` skips weight init). Every global is
restored afterwards, so the preflight can run inside a training process whose real parallel
state is already set up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_opdlm.config import JobConfig
from megatron_opdlm.models import builder
from megatron_opdlm.models.builder import TORCH_DTYPES, _build_chunk, transformer_config


class FakeGroup:
    """Stands in for a process group while building modules: answers size() and rank() only."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank

    def __repr__(self) -> str:
        return f"FakeGroup(size={self._size}, rank={self._rank})"


_GLOBAL_NAME = re.compile(r"^_[A-Z][A-Z0-9_]*$")


def _ensure_world() -> bool:
    """Megatron only consults group sizes when torch.distributed is up: a 1-rank gloo world.
    True when it was started here (and is to be destroyed after the build)."""
    if dist.is_initialized():
        return False
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


@contextlib.contextmanager
def fake_layout(tp: int, pp: int, vpp: int | None, tp_rank: int, pp_rank: int):
    """parallel_state answers as rank (tp_rank, pp_rank) of a tp x pp layout (see module doc)."""
    created = _ensure_world()
    saved = {k: v for k, v in vars(parallel_state).items() if _GLOBAL_NAME.match(k)}
    try:
        for name in saved:
            if "_GROUP" in name and not name.endswith("_RANKS") and not name.endswith("_GROUPS"):
                setattr(parallel_state, name, FakeGroup(1, 0))
        parallel_state._TENSOR_MODEL_PARALLEL_GROUP = FakeGroup(tp, tp_rank)
        parallel_state._PIPELINE_MODEL_PARALLEL_GROUP = FakeGroup(pp, pp_rank)
        parallel_state._MODEL_PARALLEL_GROUP = FakeGroup(tp * pp, pp_rank * tp + tp_rank)
        parallel_state._TENSOR_AND_CONTEXT_PARALLEL_GROUP = FakeGroup(tp, tp_rank)
        # the embedding group only serves the tied-embedding init all-reduce: none here
        parallel_state._EMBEDDING_GROUP = None
        parallel_state._POSITION_EMBEDDING_GROUP = None
        parallel_state._HIERARCHICAL_CONTEXT_PARALLEL_GROUPS = None
        parallel_state._MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE = tp
        parallel_state._MPU_TENSOR_MODEL_PARALLEL_RANK = tp_rank
        parallel_state._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = pp
        parallel_state._MPU_PIPELINE_MODEL_PARALLEL_RANK = pp_rank
        parallel_state._VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = vpp
        parallel_state._VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = None
        parallel_state._MPU_DATA_PARALLEL_WORLD_SIZE = 1
        parallel_state._MPU_DATA_PARALLEL_RANK = 0
        yield
    finally:
        for name, value in saved.items():
            setattr(parallel_state, name, value)
        if created:  # leave no process group behind for the caller
            dist.destroy_process_group()


@dataclass(frozen=True)
class ChunkCount:
    """Tensors of one model chunk (one VPP stage on one rank)."""

    params: int  # elements of all parameters (tied weights counted once)
    layers: int  # transformer layers in this chunk
    has_embedding: bool
    has_output_layer: bool  # a separate output weight (untied, or the tied copy on the last PP)


@dataclass(frozen=True)
class RankCount:
    """One (TP rank, PP stage) of a layout: its chunks for one role."""

    tp_rank: int
    pp_rank: int
    chunks: tuple[ChunkCount, ...]

    @property
    def params(self) -> int:
        return sum(c.params for c in self.chunks)

    @property
    def layers(self) -> int:
        return sum(c.layers for c in self.chunks)


def _count_chunk(module: torch.nn.Module) -> ChunkCount:
    params = list(module.named_parameters())  # deduplicates tied parameters
    gpt = module
    while hasattr(gpt, "module"):
        gpt = gpt.module
    output = getattr(gpt, "output_layer", None)
    has_output = output is not None and getattr(output, "weight", None) is not None
    return ChunkCount(
        params=sum(p.numel() for _, p in params),
        layers=len(gpt.decoder.layers),
        has_embedding=hasattr(gpt, "embedding"),
        has_output_layer=has_output,
    )


def build_meta_chunks(job: JobConfig, role: str, tp_rank: int, pp_rank: int):
    """The chunks rank (tp_rank, pp_rank) builds for `role`, on the meta device."""
    par = job.parallel
    tconfig = transformer_config(job.model, par, job.precision)
    tconfig.perform_initialization = False
    tconfig.init_model_with_meta_device = True
    tconfig.use_cpu_initialization = True
    stages = range(par.vpp) if par.vpp else [None]
    with fake_layout(par.tp, par.pp, par.vpp, tp_rank, pp_rank), _rope_on_cpu():
        with torch.device("meta"):
            return [_build_chunk(job, tconfig, role, vp_stage) for vp_stage in stages]


@contextlib.contextmanager
def _rope_on_cpu():
    """RoPE frequencies are a CPU buffer copied into the module: compute them off the meta
    device (the only tensor the builder fills with data; it holds no parameters)."""
    original = builder._llama3_inv_freq

    def on_cpu(model):
        with torch.device("cpu"):
            return original(model)

    builder._llama3_inv_freq = on_cpu
    try:
        yield
    finally:
        builder._llama3_inv_freq = original


@functools.lru_cache(maxsize=512)
def _meta_chunks_cached(key: str, role: str, tp_rank: int, pp_rank: int, job: JobConfig):
    """Meta modules hold no storage: keep them for the counts and the buffer layout alike."""
    return build_meta_chunks(job, role, tp_rank, pp_rank)


@functools.lru_cache(maxsize=512)
def _rank_count_cached(key: str, role: str, tp_rank: int, pp_rank: int, job: JobConfig):
    chunks = _meta_chunks_cached(key, role, tp_rank, pp_rank, job)
    return RankCount(tp_rank, pp_rank, tuple(_count_chunk(c) for c in chunks))


def _layout_key(job: JobConfig) -> str:
    """What the built shapes depend on: architecture, TP/PP/VPP, dtype, layer implementation."""
    par = job.parallel
    return repr(
        (dataclasses.astuple(job.model), par.tp, par.pp, par.vpp, par.sequence_parallel,
         job.precision.dtype, job.precision.transformer_impl)
    )  # fmt: skip


def rank_counts(job: JobConfig, role: str) -> dict[tuple[int, int], RankCount]:
    """Every (tp_rank, pp_rank) of the layout: the real chunks' parameter counts."""
    key = _layout_key(job)
    frozen = _Frozen(job, key)
    return {
        (t, p): _rank_count_cached(key, role, t, p, frozen)
        for p in range(job.parallel.pp)
        for t in range(job.parallel.tp)
    }


class _Frozen:
    """Hashable wrapper so the cache keys on the layout text, not the (mutable) config object."""

    def __init__(self, job: JobConfig, key: str):
        self.job, self.key = job, key

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Frozen) and other.key == self.key

    def __getattr__(self, name):
        return getattr(self.job, name)


@dataclass(frozen=True)
class StateBytes:
    """Model-state bytes of the student on one rank (the DP rank with the most optimizer state)."""

    weights: int  # parameter storage (the padded param buffer with the distributed optimizer)
    grads: int  # DDP grad buffer (fp32: grad_reduce_in_fp32)
    main_params: int  # fp32 master copies (bf16/fp16 only), this rank's shard if distributed
    adam_moments: int  # exp_avg + exp_avg_sq, this rank's shard if distributed

    @property
    def optimizer(self) -> int:
        return self.main_params + self.adam_moments

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def _meta_params(job: JobConfig, tp_rank: int, pp_rank: int) -> list[list[torch.nn.Parameter]]:
    key = _layout_key(job)
    return [
        [p for p in chunk.parameters() if p.requires_grad]
        for chunk in _meta_chunks_cached(key, "student", tp_rank, pp_rank, _Frozen(job, key))
    ]


def student_state_bytes(
    job: JobConfig, dp: int, tp_rank: int = 0, pp_rank: int = 0, dp_rank: int | None = None
) -> StateBytes:
    """Student weights, grads and optimizer state on one rank, from Megatron's buffer layout.

    dp_rank None: the DP rank holding the most optimizer state (the one that decides the fit).
    """
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    dtype = TORCH_DTYPES[job.precision.dtype]
    elem = torch.tensor([], dtype=dtype).element_size()
    half = dtype != torch.float32
    distributed = job.parallel.use_distributed_optimizer
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=job.parallel.overlap_grad_reduce,
        use_distributed_optimizer=distributed,
    )
    bucket_size = max(40_000_000, 1_000_000 * dp) if job.parallel.overlap_grad_reduce else None
    weights = grads = 0
    owned_per_rank = [0] * dp
    for index, params in enumerate(_meta_params(job, tp_rank, pp_rank)):
        numel = sum(p.numel() for p in params)
        if not distributed:
            weights += numel * elem
            grads += numel * 4
            owned_per_rank = [n + numel for n in owned_per_rank]
            continue
        # wrap_ddp: bucketing only on the first chunk, and never past the first PP stage
        chunk_bucket = bucket_size if index == 0 and pp_rank == 0 else None
        layout = DistributedOptimizer.compute_full_param_layout(
            params, chunk_bucket, dp, ddp_config
        )
        for buffer in layout.layouts.values():
            buffer_numel = buffer.bucket_indices[-1][1]
            weights += buffer_numel * elem
            grads += buffer_numel * 4
            ranges = list(buffer.param_index_map.values())
            for start, end in buffer.bucket_indices:
                shard = (end - start) // dp
                for r in range(dp):
                    lo, hi = start + r * shard, start + (r + 1) * shard
                    owned_per_rank[r] += sum(
                        max(0, min(hi, p_end) - max(lo, p_start)) for p_start, p_end, _ in ranges
                    )
    owned = max(owned_per_rank) if dp_rank is None else owned_per_rank[dp_rank]
    return StateBytes(
        weights=weights,
        grads=grads,
        main_params=owned * 4 if half else 0,
        adam_moments=owned * 8,
    )
