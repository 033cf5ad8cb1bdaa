"""Per-family tensor mappings: data only (the mapping kinds are in `mappings.py`).

Llama, Qwen2, Qwen3 and Mistral share HF tensor names; they differ in which optional tensors
exist, which the ModelConfig records: Qwen2 has q/k/v biases, Qwen3 has per-head q/k RMSNorm,
untied models (most 7B+) have `lm_head`. A new family with other names is a new list here.
"""

from __future__ import annotations

from megatron_opdlm.config import ModelConfig
from megatron_opdlm.conversion.mappings import Direct, FusedQKV, Mapping, Stacked, Vocab

_L = "decoder.layers."
_ATTN = "decoder.layers.self_attention."
_H = "model.layers.{i}."
_HA = "model.layers.{i}.self_attn."

LLAMA_LIKE: tuple[Mapping, ...] = (
    Vocab("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), mask_row_mean=True),
    Direct(_ATTN + "linear_qkv.layer_norm_weight", (_H + "input_layernorm.weight",), ("h",)),
    FusedQKV(_ATTN + "linear_qkv.weight", tuple(_HA + f"{p}_proj.weight" for p in "qkv")),
    Direct(_ATTN + "linear_proj.weight", (_HA + "o_proj.weight",), ("h", "q")),
    Direct(_L + "mlp.linear_fc1.layer_norm_weight", (_H + "post_attention_layernorm.weight",),
           ("h",)),
    Stacked(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
            ("f", "h")),
    Direct(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), ("h", "f")),
    Direct("decoder.final_layernorm.weight", ("model.norm.weight",), ("h",)),
)  # fmt: skip
UNTIED_OUTPUT = Vocab("output_layer.weight", ("lm_head.weight",))
QKV_BIAS = FusedQKV(
    _ATTN + "linear_qkv.bias", tuple(_HA + f"{p}_proj.bias" for p in "qkv"), bias=True
)
QK_NORM = (
    Direct(_ATTN + "q_layernorm.weight", (_HA + "q_norm.weight",), ("d",)),
    Direct(_ATTN + "k_layernorm.weight", (_HA + "k_norm.weight",), ("d",)),
)
FAMILY_MAPPINGS: dict[str, tuple[Mapping, ...]] = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,  # + QKV_BIAS (the config's qkv_bias is always true for Qwen2)
    "qwen3": LLAMA_LIKE,  # + QK_NORM (qk_layernorm always true)
}
# Linears whose per-layer `_extra_state` object a Megatron model's sharded_state_dict asks for.
EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2",
)  # fmt: skip
# HF tensors that carry no weights (recomputed buffers some older checkpoints contain).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def mappings_for(model: ModelConfig) -> list[Mapping]:
    """Every tensor mapping of a model, in HF order (embedding, layers, norm, head)."""
    if model.family not in FAMILY_MAPPINGS:
        raise ValueError(f"no mapping for family {model.family!r}; known: {list(FAMILY_MAPPINGS)}")
    out = list(FAMILY_MAPPINGS[model.family])
    extra: list[Mapping] = []
    if model.qkv_bias:
        extra.append(QKV_BIAS)
    if model.qk_layernorm:
        extra.extend(QK_NORM)
    out[3:3] = extra  # after linear_qkv.weight, beside the other attention tensors
    if not model.tie_word_embeddings:
        out.append(UNTIED_OUTPUT)
    return out
