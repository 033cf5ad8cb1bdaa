"""Megatron DDP wrapping, the Megatron optimizer (Adam/AdamW, distributed option), LR updates.

Loss normalisation: the distillation loss of a micro-batch is already divided by the number of
loss tokens of the whole optimizer step over all DP ranks, so gradients must be *summed* over
micro-batches and DP ranks. We set `calculate_per_token_loss` on the student's config (the
schedule then does not divide by the number of micro-batches and DDP sums instead of averaging)
and give the schedule a finalize function that does not rescale by a token count again.
"""

from __future__ import annotations

import functools
import types

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_opdlm.config import JobConfig
from megatron_opdlm.models.builder import TORCH_DTYPES


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def _finalize_without_token_scaling(model, num_tokens=None, **kwargs):
    # The loss is normalised by the global loss-token count before backward (see module doc).
    return finalize_model_grads(model, None, **kwargs)


# Gradient-bucket size with overlap_grad_reduce, fixed: megatron-core's default is
# max(40M, 1M x DP), so above DP 40 the bucket layout (and with it the flat buffers of a
# dp_reshardable optimizer checkpoint) would depend on DP and the checkpoint would no longer load
# at another DP size. 40M is that default for DP <= 40.
DDP_BUCKET_SIZE = 40_000_000


def wrap_ddp(chunks: list[torch.nn.Module], job: JobConfig) -> list[DistributedDataParallel]:
    """Wrap the student's chunks in Megatron DDP; weights are made equal over DP ranks."""
    config = unwrap(chunks[0]).config
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=job.parallel.overlap_grad_reduce,
        bucket_size=DDP_BUCKET_SIZE if job.parallel.overlap_grad_reduce else None,
        use_distributed_optimizer=job.parallel.use_distributed_optimizer,
        average_in_collective=False,
    )
    wrapped = [
        DistributedDataParallel(
            config=config,
            ddp_config=ddp_config,
            module=chunk,
            # Only the first chunk uses bucketing (as Megatron-LM does with virtual stages).
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()
    config.finalize_model_grads_func = _finalize_without_token_scaling
    if job.parallel.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in wrapped]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return wrapped


def build_optimizer(job: JobConfig, ddp_chunks: list[DistributedDataParallel]):
    """Megatron optimizer over the DDP-wrapped chunks (AdamW when weight decay is set)."""
    optim = job.optim
    dtype = job.precision.dtype
    config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        params_dtype=TORCH_DTYPES[dtype],
        use_distributed_optimizer=job.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, ddp_chunks)
    model_config = unwrap(ddp_chunks[0]).config
    model_config.grad_scale_func = optimizer.scale_loss
    for inner in _inner_optimizers(optimizer):
        _fix_distributed_optimizer_checkpointing(inner)
    return optimizer


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def grad_norm_then_step(optimizer, step_if) -> tuple[bool, float]:
    """One gradient norm per step, checked before the update (bf16 / fp32; fp16 uses step()).

    Megatron's `optimizer.step()` is prepare_grads -> grad norm (+ clip) -> update, with no way
    to stop between the norm and the update; computing the norm first and then calling step()
    would do both twice (an extra pass over the grads and an extra model-parallel all-reduce).
    This runs the same pieces once: prepare_grads, the norm, `step_if(norm)` (a collective
    check, e.g. the finite check), then clipping by that norm and `step_with_ready_grads`.
    Returns (stepped, grad norm). Our models register no separate grad-norm groups.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if not step_if(grad_norm):
        return False, grad_norm
    for inner in _inner_optimizers(optimizer):
        params = inner.get_parameters()
        if inner.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=inner.config.clip_grad,
                total_norm=grad_norm,
                use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
            )
    return bool(optimizer.step_with_ready_grads()), grad_norm


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _fix_distributed_optimizer_checkpointing(inner) -> None:
    """Make DistributedOptimizer checkpoints exact with plain torch Adam (no Apex/TE), 0.19.x.

    Measured failures without this (any hardware; tests/unit/test_training.py resumes exactly):
    a) `sharded_state_dict(is_loading=True)` on a fresh optimizer calls `state_dict()`, which
       asserts a single torch-Adam 'step' -> prime the state with a no-op step first;
    b) `_set_main_param_and_optimizer_states` copies every state tensor, including torch-Adam's
       per-param 'step' that the checkpoint does not carry (KeyError; the step is restored from
       param_groups) and, with fp32 params, writes into a view of a leaf that requires grad;
    c) `load_state_dict` gives every param one shared 'step' tensor, so torch Adam adds 1 per
       param per step and the bias correction drifts after a resume -> un-share it.
    """
    from megatron.core.optimizer import distrib_optimizer

    if not isinstance(inner, distrib_optimizer.DistributedOptimizer):
        return
    if getattr(distrib_optimizer, "HAVE_APEX_OR_TE", False) or getattr(
        inner, "_opdlm_fixed", False
    ):
        return
    inner._opdlm_fixed = True
    cls = type(inner)

    @functools.wraps(cls.sharded_state_dict)
    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, **kwargs):
        if is_loading and len(self.optimizer.state) == 0:
            prime_optimizer_state(self)
        return cls.sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, **kwargs)

    @functools.wraps(cls._set_main_param_and_optimizer_states)
    def set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        step = state.pop("step", None)
        tensors = {key: value for key, value in tensors.items() if key != "step"}
        try:
            with torch.no_grad():
                return cls._set_main_param_and_optimizer_states(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    @functools.wraps(cls.load_state_dict)
    def load_state_dict(self, state_dict):
        result = cls.load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    inner.sharded_state_dict = types.MethodType(sharded_state_dict, inner)
    inner._set_main_param_and_optimizer_states = types.MethodType(set_states, inner)
    inner.load_state_dict = types.MethodType(load_state_dict, inner)


@torch.no_grad()
def prime_optimizer_state(inner) -> None:
    """Allocate torch-Adam state with a zero-gradient step that leaves parameters unchanged.

    (Megatron's `_init_optimizer_states_with_dummy_values` steps with the live learning rate and
    weight decay, which would shrink the weights when weight decay is on.) Loading overwrites
    every state value afterwards.
    """
    saved = [
        (group["lr"], group.get("weight_decay", 0.0)) for group in inner.optimizer.param_groups
    ]
    for group in inner.optimizer.param_groups:
        group["lr"] = 0.0
        group["weight_decay"] = 0.0
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    inner.optimizer.step()
    inner.optimizer.zero_grad()
    for group, (lr, weight_decay) in zip(inner.optimizer.param_groups, saved):
        group["lr"] = lr
        group["weight_decay"] = weight_decay


def data_parallel_size() -> int:
    return parallel_state.get_data_parallel_world_size()
