"""Collectives of host-side values (flags, counts, metrics) on the process group's own device.

NCCL only moves CUDA tensors and gloo only CPU ones, so a count built with `torch.tensor([...])`
works on a CPU test machine and raises "No backend type associated with device type cpu" on the
first GPU step. Every collective of Python values in the library goes through this module: it
builds the tensor on `comm_device(group)` and hands back Python values, so callers never choose a
device. Tensor collectives inside the model math (vocab-parallel softmax, pipeline p2p) run on the
tensors' own device and do not belong here.

Without an initialised process group every function is the identity of one rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def comm_device(group=None) -> torch.device:
    """The device a tensor must live on to be reduced over `group` (CUDA for NCCL, else CPU)."""
    if not initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def group_size(group=None) -> int:
    return dist.get_world_size(group) if initialized() else 1


def group_rank(group=None) -> int:
    return dist.get_rank(group) if initialized() else 0


def all_reduce_values(
    values: Sequence[float | int | bool], op: str = "sum", group=None
) -> list[float | int]:
    """Element-wise reduction of Python numbers over `group`; ints stay ints (int64, exact)."""
    if op not in _OPS:
        raise ValueError(f"op={op!r} must be one of {sorted(_OPS)}")
    values = list(values)
    integral = all(isinstance(v, (bool, int)) for v in values)
    dtype = torch.int64 if integral else torch.float64
    if not initialized() or not values:
        return [int(v) for v in values] if integral else [float(v) for v in values]
    buffer = torch.tensor(values, dtype=dtype, device=comm_device(group))
    dist.all_reduce(buffer, op=_OPS[op], group=group)
    return buffer.cpu().tolist()


def all_reduce_value(value: float | int | bool, op: str = "sum", group=None) -> float | int:
    return all_reduce_values([value], op=op, group=group)[0]


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank of `group` when `flag` is True on at least one."""
    return bool(all_reduce_value(int(bool(flag)), op="max", group=group))


def ranks_where(flag: bool, group=None) -> list[int]:
    """The ranks of `group` (group-local numbering) where `flag` is True; one small all-reduce."""
    size = group_size(group)
    flags = [0] * size
    flags[group_rank(group)] = int(bool(flag))
    reduced = all_reduce_values(flags, op="sum", group=group)
    return [rank for rank, value in enumerate(reduced) if value]


def gather_strings(text: str | None, group=None) -> list[str | None]:
    """Every rank's `text` (None where a rank has nothing), in rank order, on every rank.

    Object collectives pickle through a tensor on the backend's device; torch picks the current
    CUDA device for NCCL, which `runtime.distributed.initialize` sets.
    """
    if not initialized():
        return [text]
    gathered: list[str | None] = [None] * group_size(group)
    dist.all_gather_object(gathered, text, group=group)
    return gathered


def broadcast_tensor_(tensor: torch.Tensor, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank `src`; the tensor must already be on `comm_device`."""
    if initialized():
        if tensor.device != comm_device(group):
            raise ValueError(
                f"broadcast of a tensor on {tensor.device} over a group whose backend needs "
                f"{comm_device(group)}; move it with .to(comm_device(group)) first"
            )
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def all_reduce_tensor_(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place sum over `group` of a tensor already on `comm_device` (activations of a TP
    group: megatron's `_reduce`); a group of one returns it untouched."""
    if initialized() and group_size(group) > 1:
        if tensor.device != comm_device(group):
            raise ValueError(
                f"all-reduce of a tensor on {tensor.device} over a group whose backend needs "
                f"{comm_device(group)}; move it with .to(comm_device(group)) first"
            )
        dist.all_reduce(tensor, group=group)
    return tensor


def group_ranks(group) -> list[int]:
    """Global ranks of `group`, in group order ([0] without a process group)."""
    return dist.get_process_group_ranks(group) if initialized() else [0]


def _point_to_point_device(tensor: torch.Tensor, group) -> None:
    if tensor.device != comm_device(group):
        raise ValueError(
            f"point-to-point send of a tensor on {tensor.device} over a group whose backend "
            f"needs {comm_device(group)}; move it with .to(comm_device(group)) first"
        )


def isend_tensor(tensor: torch.Tensor, dst: int, group=None, tag: int = 0):
    """Start sending `tensor` to global rank `dst`; returns the work handle (`.wait()` it)."""
    _point_to_point_device(tensor, group)
    return dist.isend(tensor, dst=dst, group=group, tag=tag)


def irecv_tensor(tensor: torch.Tensor, src: int, group=None, tag: int = 0):
    """Start receiving into `tensor` from global rank `src`; returns the work handle."""
    _point_to_point_device(tensor, group)
    return dist.irecv(tensor, src=src, group=group, tag=tag)


def barrier(group=None) -> None:
    if initialized():
        dist.barrier(group=group)
