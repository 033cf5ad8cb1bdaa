"""Vocabulary-parallel primitives: the vocabulary stays sharded over the tensor-parallel group.

Each rank holds logits [n, V/tp] for its slice [vocab_start, vocab_start + V/tp) of the padded
vocabulary. Per-token reductions over the vocabulary become a local reduction plus an all-reduce
over the TP group (as megatron's `vocab_parallel_cross_entropy` does); nothing of full vocabulary
width is created on a rank. `group=None` means no tensor parallelism (one shard = everything).

Autograd convention (Megatron's): the loss is computed identically on every TP rank, so a value
that an all-reduce replicates has the same gradient on every rank.
- `all_reduce_sum`: forward sums over the group, backward is the identity. Correct when the
  result is consumed by replicated computation (every rank applies the same function to it).
  Divergences therefore sum *elementwise* terms of local log-probs locally and all-reduce once.
- `log_softmax`: the normaliser couples all shards; its backward is exact with one all-reduce:
  d logp_i / d x_j = delta_ij - p_j, so grad_x = g - p * sum_v g_v (the sum all-reduced).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def default_tp_group():
    """Megatron's tensor-parallel group when it has more than one rank, else None."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """At least float32 for the softmax (bf16/fp16 logits are upcast; float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def vocab_start(local_width: int, group) -> int:
    """First global vocabulary id held by this rank (Megatron shards the vocab in equal slices)."""
    return group_rank(group) * local_width


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum over the TP group; identity backward (see the module docstring)."""
    if group is None:
        return tensor
    return _AllReduceSum.apply(tensor, group)


class _VocabParallelLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, group):  # logits [n, V/tp]
        row_max = logits.amax(dim=-1, keepdim=True)  # [n, 1]
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max
        sum_exp = shifted.exp().sum(dim=-1, keepdim=True)  # [n, 1]
        if group is not None:
            dist.all_reduce(sum_exp, op=dist.ReduceOp.SUM, group=group)
        logp = shifted - sum_exp.log()  # [n, V/tp]
        ctx.group = group
        ctx.save_for_backward(logp)
        return logp

    @staticmethod
    def backward(ctx, grad):  # grad [n, V/tp]
        (logp,) = ctx.saved_tensors
        grad_total = grad.sum(dim=-1, keepdim=True)  # [n, 1]
        if ctx.group is not None:
            dist.all_reduce(grad_total, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad - logp.exp() * grad_total, None


def log_softmax(logits: torch.Tensor, group) -> torch.Tensor:
    """Log-softmax over the sharded last dimension: [n, V/tp] -> [n, V/tp].

    Rows whose logits are -inf (invalid vocabulary ids) get -inf and a zero gradient.
    """
    return _VocabParallelLogSoftmax.apply(logits, group)


def gather(logp: torch.Tensor, ids: torch.Tensor, start: int, group) -> torch.Tensor:
    """logp[n, V/tp] at global vocabulary ids [n, k] -> [n, k], replicated on every rank.

    Each rank reads the ids it owns, the others contribute 0, and one all-reduce completes it.
    """
    width = logp.shape[-1]
    local = (ids >= start) & (ids < start + width)  # [n, k]
    local_ids = (ids - start).clamp(0, width - 1)
    picked = logp.gather(-1, local_ids).masked_fill(~local, 0.0)  # [n, k]
    return all_reduce_sum(picked, group)


@torch.no_grad()
def topk(values: torch.Tensor, k: int, start: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of [n, V/tp] over the whole sharded vocabulary: (values [n, k], global ids [n, k]).

    Each rank takes its local top-min(k, V/tp); the tp * k candidates are all-gathered (k per
    rank, never V) and reduced to the global top-k. Not differentiable (teacher side only).
    """
    width = values.shape[-1]
    tp = group_size(group)
    if k > width * tp:
        raise ValueError(f"top-k of {k} exceeds the vocabulary size {width * tp}")
    local_values, local_ids = values.topk(min(k, width), dim=-1)  # [n, k_local]
    local_ids = local_ids + start
    if group is not None:
        gathered_values = [torch.empty_like(local_values) for _ in range(tp)]
        gathered_ids = [torch.empty_like(local_ids) for _ in range(tp)]
        dist.all_gather(gathered_values, local_values.contiguous(), group=group)
        dist.all_gather(gathered_ids, local_ids.contiguous(), group=group)
        local_values = torch.cat(gathered_values, dim=-1)  # [n, tp * k_local]
        local_ids = torch.cat(gathered_ids, dim=-1)
    top_values, position = local_values.topk(k, dim=-1)  # [n, k]
    return top_values, local_ids.gather(-1, position)
