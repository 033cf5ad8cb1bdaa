"""Layer specs: Transformer Engine on GPUs (bf16/FP8), Megatron's local modules elsewhere.

The student differs from the teacher only in its attention mask type: we change attention through
the spec and the mask we pass, never by forking GPTModel. `attention_mask_type` is the one place
that chooses the mask type per (role, impl); every caller passes an explicit dense mask
[b, 1, s, s] (True = masked out) that carries causality and padding, so the model is right under
any mask type that honours an explicit mask.
"""

from __future__ import annotations

import importlib.util

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_opdlm.config import ModelConfig, PrecisionConfig
from megatron_opdlm.models.norms import RMSNorm


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(precision: PrecisionConfig) -> str:
    """'transformer_engine' or 'local'; a clear error when TE is asked for but missing."""
    impl = precision.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if transformer_engine_available() else "local"
    if impl == "transformer_engine" and not transformer_engine_available():
        raise ValueError(
            "precision.transformer_impl=transformer_engine (or precision.fp8) needs CUDA and the "
            "transformer-engine package (pip install .[gpu] on a GPU image); "
            "use precision.transformer_impl=local on this machine"
        )
    if precision.fp8 != "none" and impl != "transformer_engine":
        raise ValueError(
            f"precision.fp8={precision.fp8} needs Transformer Engine, which is not available here"
        )
    return impl


ROLES = ("teacher", "student")
IMPLS = ("local", "transformer_engine")


def attention_mask_type(role: str, impl: str) -> AttnMaskType:
    """The self-attention mask type of `role` ('teacher' | 'student') under `impl`.

    - student, any impl: `arbitrary`; the block-diffusion masks of `models.masks`.
    - teacher, local: `causal`. Megatron's local core attention applies the explicit mask it is
      given (the trainer passes `causal_mask(valid)`, padding included) and builds the causal
      one itself when a caller passes None.
    - teacher, transformer_engine: `arbitrary`. Under `causal` TE ignores `attention_mask`
      (mcore TEDotProductAttention forwards only the mask type), so left-padded rows would attend
      to the padding. `padding_causal` would take a [b, 1, 1, s] key mask that TE's fused and
      flash backends turn into per-row lengths, which describes right padding; our rows are
      left-padded. `arbitrary` applies the explicit [b, 1, s, s] mask as given.
    A FlexAttention core attention (a block-mask kernel) plugs in here by role.
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r} must be one of {ROLES}")
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r} must be one of {IMPLS}")
    if role == "teacher" and impl == "local":
        return AttnMaskType.causal
    return AttnMaskType.arbitrary


def needs_explicit_mask(role: str, impl: str) -> bool:
    """True when a forward without an attention mask would not be causal (mask type arbitrary)."""
    return attention_mask_type(role, impl) != AttnMaskType.causal


def layer_spec(model: ModelConfig, impl: str, role: str) -> ModuleSpec:
    """Spec for one transformer layer of `role` 'teacher' (causal) or 'student' (block mask)."""
    mask_type = attention_mask_type(role, impl)  # validates role and impl
    if impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization="RMSNorm")
        # our RMSNorm: same function as torch's, and it supports sequence parallelism
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        if model.qk_layernorm:
            spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
            spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    spec.submodules.self_attention.params = {
        **spec.submodules.self_attention.params,
        "attn_mask_type": mask_type,
    }
    return spec


def block_spec(
    model: ModelConfig,
    impl: str,
    role: str,
    tconfig,
    vp_stage: int | None,
    attention_backend: str | None = None,
):
    """Decoder block spec: this stage's layers, and the final norm matching the layer spec.

    `attention_backend` ('flex' | 'te' | 'local', resolved; None = the spec's own core)."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = layer_spec(model, impl, role)
    # attention core substitution (models.flex_attention): the one place the backend enters
    if attention_backend is not None:
        from megatron_opdlm.models.flex_attention import use_attention_backend

        layer = use_attention_backend(layer, attention_backend)
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = RMSNorm
    num_layers = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)
