"""The rollout engine's transformer layer: megatron's layer computation without its module tree.

A cached round is a few query rows per slot, so a layer's cost there is its weight reads plus
the Python around them. Megatron's TransformerLayer spends the latter on ~15 module calls, five
autograd-Function applies (identity TP mappings, viewless-tensor wrappers) and the branches of
features a rollout never uses, per layer; that made our AR step 1.2-1.4x transformers' step at
batch 1 with equal GEMM time (profile in docs/bench_rollout/README.md). `lean_layers(chunks)`
gives each supported layer a `forward` that runs the same operations in the same order on the
same parameters for forwards on a `SlotCache` (so the same bits: tests/unit/test_engine.py,
`test_lean_layers_give_megatron_layers_bits`):

    x -> input norm -> linear_qkv (+bias) -> split per query group -> slot RoPE + K/V cache
      -> SDPA core -> linear_proj (+ TP all-reduce) -> + residual
      -> pre-MLP norm -> linear_fc1 -> GLU / activation -> linear_fc2 (+ TP all-reduce)
      -> + residual

Everything else runs megatron's own forward: training and any forward without a SlotCache, and
layers it does not cover (checked once per layer on entry, `lean_supported`): Transformer
Engine's fused norm-linears (the GPU spec: there CUDA graphs are the remedy for per-op
overhead), MoE, cross attention, q/k norms, gated attention, biases outside linear_qkv,
sequence parallelism, fused activations other than SwiGLU, fp8, offloading, recompute,
per-layer no-RoPE.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_opdlm.diffusion.slot_cache import (
    SlotCache,
    slot_core_attention,
    slot_core_supported,
    slot_key_values,
)
from megatron_opdlm.runtime import collectives, cpu_compat


def _plain_linear(linear, bias_allowed: bool) -> bool:
    """A megatron Column/RowParallelLinear whose forward is one matmul (+ bias, + TP reduce)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    if type(linear) not in (ColumnParallelLinear, RowParallelLinear):
        return False
    if linear.sequence_parallel or getattr(linear, "explicit_expert_comm", False):
        return False
    if isinstance(linear, ColumnParallelLinear) and linear.gather_output:
        return False
    if isinstance(linear, RowParallelLinear) and not linear.input_is_parallel:
        return False
    if getattr(linear, "gtp_remat_size", 1) > 1:
        return False
    return linear.bias is None or (bias_allowed and not linear.skip_bias_add)


def lean_supported(layer: torch.nn.Module) -> bool:
    """True when `layer` is a TransformerLayer that the lean forward computes exactly."""
    if type(layer) is not TransformerLayer:
        return False
    config, attention, mlp = layer.config, layer.self_attention, layer.mlp
    return (
        type(attention) is SelfAttention
        and slot_core_supported(attention.core_attention)
        and isinstance(layer.cross_attention, IdentityOp)
        and type(mlp) is MLP
        # the norms are called as modules (any norm); IdentityOp: TE's norm inside the linear
        and not isinstance(layer.input_layernorm, IdentityOp)
        and not isinstance(layer.pre_mlp_layernorm, IdentityOp)
        and attention.q_layernorm is None
        and attention.k_layernorm is None
        and not config.attention_output_gate
        and config.num_query_groups >= attention.world_size  # no all-gather of mixed qkv
        and _plain_linear(attention.linear_qkv, bias_allowed=True)
        and _plain_linear(attention.linear_proj, bias_allowed=False)
        and _plain_linear(mlp.linear_fc1, bias_allowed=False)
        and _plain_linear(mlp.linear_fc2, bias_allowed=False)
        # megatron's fused activation (the GPU default) only where it is SwiGLU: called as is
        and (
            not config.bias_activation_fusion
            or (config.gated_linear_unit and mlp.activation_func is F.silu)
        )  # fmt: skip
        and not config.use_te_activation_func
        and not config.apply_residual_connection_post_layernorm
        and not config.fp32_residual_connection
        and not config.sequence_parallel
        and not config.fp8
        and not config.no_rope_freq
        and not config.cpu_offloading
        and not config.test_mode
        and not getattr(layer, "recompute_input_layernorm", False)
        and not getattr(layer, "recompute_pre_mlp_layernorm", False)
        and not getattr(layer, "recompute_mlp", False)
    )


def _matmul(linear, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ linear.weight^T -> [..., out/tp]: the product megatron's linear computes,
    or cpu_compat's few-row product where `small_row_linears` replaced it (the engine's
    context) and would compute it."""
    if "_forward_impl" in vars(linear) and cpu_compat.few_row_linear_applies(x):
        return cpu_compat.few_row_linear(x, linear.weight)
    return torch.matmul(x, linear.weight.t())  # megatron's LinearWithGradAccumulation... forward


def _reduce(linear, x: torch.Tensor) -> torch.Tensor:
    """RowParallelLinear's all-reduce over its TP group (megatron's `_reduce`)."""
    if linear.tp_group is None or linear.tp_group.size() == 1:
        return x
    return collectives.all_reduce_tensor_(x.contiguous(), group=linear.tp_group)


def _attention(layer, x, attention_mask, rotary_pos_emb, cache):
    """Self-attention of the normed input x [n, b, h] on the SlotCache -> [n, b, h]."""
    attention = layer.self_attention
    qkv = _matmul(attention.linear_qkv, x)  # [n, b, groups * (heads/groups + 2) * dh]
    if attention.linear_qkv.bias is not None:
        qkv = qkv + attention.linear_qkv.bias
    groups = attention.num_query_groups_per_partition
    per_group = attention.num_attention_heads_per_partition // groups
    dh = attention.hidden_size_per_attention_head
    qkv = qkv.view(*qkv.shape[:2], groups, (per_group + 2) * dh)  # [n, b, g, (q + 2) * dh]
    query, key, value = torch.split(qkv, [per_group * dh, dh, dh], dim=3)
    query = query.reshape(query.size(0), query.size(1), -1, dh)  # [n, b, heads, dh]
    query, keys, values = slot_key_values(attention, cache, query, key, value, rotary_pos_emb)
    context = slot_core_attention(
        attention.core_attention, query, keys, values, attention_mask, attention.attn_mask_type
    )  # [n, b, heads * dh]
    return _reduce(attention.linear_proj, _matmul(attention.linear_proj, context))  # [n, b, h]


def _mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """megatron's MLP.forward: fc1, fused SwiGLU / GLU / activation, fc2 (+ TP reduce)."""
    config = mlp.config
    hidden = _matmul(mlp.linear_fc1, x)  # [n, b, ffn/tp (x2 gated)]
    if config.bias_activation_fusion:  # SwiGLU (lean_supported): megatron's fused call, no bias
        hidden = bias_swiglu_impl(hidden, None, config.activation_func_fp8_input_store, False)
    elif config.gated_linear_unit:  # megatron's glu(): chunk, clamp, act(x0) * (x1 + offset)
        x_glu, x_linear = torch.chunk(hidden, 2, dim=-1)
        if (val := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        hidden = config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)
    else:
        hidden = mlp.activation_func(hidden)
    return _reduce(mlp.linear_fc2, _matmul(mlp.linear_fc2, hidden))  # [n, b, h]


def _lean_forward(layer):
    fallback = type(layer).forward.__get__(layer)

    def forward(hidden_states=None, attention_mask=None, *args, **kwargs):
        cache = kwargs.get("inference_context")
        if (
            args
            or not isinstance(cache, SlotCache)
            or torch.is_grad_enabled()
            or layer.training
            or kwargs.get("context") is not None
            or kwargs.get("attention_bias") is not None
            or kwargs.get("packed_seq_params") is not None
        ):
            return fallback(hidden_states, attention_mask, *args, **kwargs)
        # hidden_states [n, b, h]; dropout is the identity in eval, the residual adds as bda's
        residual = hidden_states
        normed = layer.input_layernorm(hidden_states)
        out = _attention(layer, normed, attention_mask, kwargs.get("rotary_pos_emb"), cache)
        hidden_states = residual + out
        out = _mlp(layer.mlp, layer.pre_mlp_layernorm(hidden_states))
        return hidden_states + out, None

    return forward


@contextlib.contextmanager
def lean_layers(model_chunks: list[torch.nn.Module]):
    """Give every supported TransformerLayer of the chunks the lean forward (restored after)."""
    layers = [m for c in model_chunks for m in c.modules() if lean_supported(m)]
    layers = [layer for layer in layers if "forward" not in vars(layer)]
    for layer in layers:
        layer.forward = _lean_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
