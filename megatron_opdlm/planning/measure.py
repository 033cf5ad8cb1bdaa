"""What the code really allocates, for checking the planner: tensor bytes, saved activations.

- `model_state_bytes`: unique storages of the student's parameters, DDP grad buffers
  (`main_grad`) and optimizer state (fp32 master shards, Adam moments), per rank.
- `SavedTensorBytes`: bytes of the tensors autograd saves for backward during a forward
  (`torch.autograd.graph.saved_tensors_hooks`), each storage counted once, parameters excluded
  (they are weights, not activations).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def _unique_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None or tensor.device.type == "meta":
            continue
        ptr, nbytes = _storage_key(tensor)
        if nbytes:
            seen[ptr] = nbytes
    return sum(seen.values())


@dataclass(frozen=True)
class MeasuredState:
    weights: int
    grads: int
    optimizer: int  # fp32 master params + Adam moments (per-parameter scalar 'step' excluded)


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def model_state_bytes(ddp_chunks, optimizer) -> MeasuredState:
    """Bytes of the real tensors on this rank (call after one optimizer step)."""
    params = [p for chunk in ddp_chunks for p in chunk.parameters()]
    grads = [getattr(p, "main_grad", None) for p in params]
    state = []
    for inner in _inner_optimizers(optimizer):
        torch_opt = inner.optimizer
        for group in torch_opt.param_groups:
            for main in group["params"]:
                for key, value in torch_opt.state.get(main, {}).items():
                    if key != "step" and torch.is_tensor(value):
                        state.append(value)
        # fp32 master params of bf16/fp16 weights (with or without the distributed optimizer)
        for name in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups"):
            for group in getattr(inner, name, None) or []:
                state.extend(group)
    return MeasuredState(
        weights=_unique_bytes(params), grads=_unique_bytes(grads), optimizer=_unique_bytes(state)
    )


class SavedTensorBytes:
    """Context manager: `bytes` = unique storage bytes saved for backward inside it.

    Keep the forward's outputs alive until `bytes` is read: a freed graph releases its saved
    tensors, and a later allocation at the same address would be counted once for both."""

    def __init__(self, exclude: list[torch.Tensor] | None = None):
        self._exclude = {_storage_key(t)[0] for t in (exclude or [])}
        self._seen: dict[int, int] = {}
        self._hooks = None

    def _pack(self, tensor: torch.Tensor):
        ptr, nbytes = _storage_key(tensor)
        if ptr not in self._exclude and nbytes:
            self._seen[ptr] = nbytes
        return tensor

    def __enter__(self) -> SavedTensorBytes:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())
