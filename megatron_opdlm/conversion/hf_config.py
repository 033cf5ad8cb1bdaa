"""Hugging Face config.json <-> ModelConfig (and DiffusionConfig for exported students).

Supported families and how they differ from Llama (the mapping in `families.py` is shared):
  llama    LlamaForCausalLM    optional Llama-3 RoPE scaling
  qwen2    Qwen2ForCausalLM    bias on q/k/v projections
  qwen3    Qwen3ForCausalLM    RMSNorm on queries and keys per head; head_dim may differ
  mistral  MistralForCausalLM  sliding-window attention (Megatron attends fully: see below)
"""

from __future__ import annotations

import math

from megatron_opdlm.config import DiffusionConfig, ModelConfig
from megatron_opdlm.runtime.logging import get_logger

log = get_logger(__name__)

# family -> (HF architecture, HF model_type, q/k/v bias always on, per-head q/k RMSNorm)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama", False, False),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", True, False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False, True),
    "mistral": ("MistralForCausalLM", "mistral", False, False),
}
VOCAB_ALIGN = 128  # padded vocabulary is a multiple of this (divisible by any power-of-2 TP <= 128)
OPDLM_KEY = "opdlm"  # config.json section of an exported student


def supported_architectures() -> list[str]:
    return [arch for arch, *_ in FAMILIES.values()]


def detect_family(hf: dict) -> str:
    """Family name from `architectures` (preferred) or `model_type`."""
    exported_family = (hf.get(OPDLM_KEY) or {}).get("family")  # a student exported as a DLM
    if exported_family in FAMILIES:
        return exported_family
    archs = hf.get("architectures") or []
    for family, (arch, *_) in FAMILIES.items():
        if arch in archs:
            return family
    if not archs:
        for family, (_, model_type, *_) in FAMILIES.items():
            if hf.get("model_type") == model_type:
                return family
    raise ValueError(
        f"unsupported architecture {archs or hf.get('model_type')!r}; supported: "
        f"{', '.join(supported_architectures())}"
    )


def _rope(hf: dict) -> dict:
    """RoPE fields; transformers 5 writes `rope_parameters`, older versions `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    out = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind != "llama3":
        raise ValueError(
            f"RoPE scaling {kind!r} is not supported (supported: none, llama3); "
            "convert a checkpoint without it or add the scaling to models/builder.py"
        )
    out.update(
        rope_scaling="llama3",
        rope_scaling_factor=float(params["factor"]),
        rope_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        rope_original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", 8192)
        ),
    )
    return out


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def eos_token_ids_from_hf(hf: dict, generation_config: dict | None = None) -> list[int]:
    """End-of-sequence ids: generation_config.json's list first (Llama-3-Instruct ends a turn with
    <|eot_id|>, listed only there), then config.json's; ValueError when neither names one."""
    ids = _token_ids((generation_config or {}).get("eos_token_id"))
    ids += [i for i in _token_ids(hf.get("eos_token_id")) if i not in ids]
    if not ids:
        raise ValueError(
            "config.json: no eos_token_id (nor in generation_config.json); a response could "
            "never end; add eos_token_id to config.json"
        )
    return ids


def model_config_from_hf(
    hf: dict,
    tp: int = 1,
    generation_config: dict | None = None,
    mask_token_id: int | None = None,
) -> ModelConfig:
    """ModelConfig of an HF config.json dict (and generation_config.json, for EOS ids); the padded
    vocabulary divides by 128 and `tp`. `mask_token_id`: an unused row (e.g. one of Qwen3's
    padded rows) as the student's mask token instead of an added row."""
    family = detect_family(hf)
    _, _, qkv_bias, qk_norm = FAMILIES[family]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (only silu, SwiGLU)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported (Megatron layers here have no MLP bias)")
    if hf.get("attention_bias"):
        raise ValueError(
            "attention_bias=true (bias on q/k/v and o_proj) is not supported; only Qwen2's "
            "q/k/v bias is"
        )
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads == hidden:
        head_dim = None  # the default; keep the config minimal
    opdlm = hf.get(OPDLM_KEY) or {}
    vocab_size = int(opdlm.get("vocab_size", hf["vocab_size"]))
    eos = eos_token_ids_from_hf(hf, generation_config)
    pad = hf.get("pad_token_id")
    max_pos = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window")
    if window and hf.get("use_sliding_window", family == "mistral") and int(window) < max_pos:
        # Megatron's attention here is full: exact up to the window, so cap the length there.
        log.warning(
            "sliding_window=%s: Megatron attends to the full context; max_position_embeddings "
            "is capped at %s so that results match the HF model",
            window,
            window,
        )
        max_pos = int(window)
    cfg = ModelConfig(
        family=family,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim is None else int(head_dim),
        vocab_size=vocab_size,
        vocab_pad_multiple=VOCAB_ALIGN * tp // math.gcd(VOCAB_ALIGN, tp),
        mask_token_id=mask_token_id
        if mask_token_id is not None
        else opdlm.get("mask_token_id_config"),
        eos_token_ids=eos,
        pad_token_id=int(pad) if pad is not None and 0 <= int(pad) < vocab_size else eos[0],
        max_position_embeddings=max_pos,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qk_layernorm=qk_norm,
        qkv_bias=qkv_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **_rope(hf),
    )
    cfg.validate()
    return cfg


def diffusion_config_from_hf(hf: dict) -> DiffusionConfig | None:
    """The student's DiffusionConfig recorded by an export, None for an AR model."""
    opdlm = hf.get(OPDLM_KEY)
    if not opdlm:
        return None
    cfg = DiffusionConfig(
        block_size=int(opdlm["block_size"]), token_shift=bool(opdlm["token_shift"])
    )
    cfg.validate()
    return cfg


def hf_config_from_model(
    model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig | None = None, dtype: str = "bfloat16"
) -> dict:
    """config.json for an export. A student keeps its mask row, so its HF vocab_size is one larger
    when the row was added; the `opdlm` section records what is needed to run it."""
    arch, model_type, *_ = FAMILIES[model_cfg.family]
    vocab_rows = export_vocab_rows(model_cfg, diffusion_cfg)
    rope: dict = {"rope_theta": model_cfg.rope_theta, "rope_type": "default"}
    if model_cfg.rope_scaling == "llama3":
        rope.update(
            rope_type="llama3",
            factor=model_cfg.rope_scaling_factor,
            low_freq_factor=model_cfg.rope_low_freq_factor,
            high_freq_factor=model_cfg.rope_high_freq_factor,
            original_max_position_embeddings=model_cfg.rope_original_max_position_embeddings,
        )
    hf = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": model_cfg.hidden_size,
        "intermediate_size": model_cfg.ffn_hidden_size,
        "num_hidden_layers": model_cfg.num_layers,
        "num_attention_heads": model_cfg.num_attention_heads,
        "num_key_value_heads": model_cfg.num_query_groups,
        "head_dim": model_cfg.kv_channels,
        "vocab_size": vocab_rows,
        "max_position_embeddings": model_cfg.max_position_embeddings,
        "rms_norm_eps": model_cfg.norm_eps,
        "tie_word_embeddings": model_cfg.tie_word_embeddings,
        "attention_bias": False,
        "eos_token_id": model_cfg.eos_token_ids[0]
        if len(model_cfg.eos_token_ids) == 1
        else list(model_cfg.eos_token_ids),
        "pad_token_id": model_cfg.pad_token_id,
        "rope_theta": model_cfg.rope_theta,
        "rope_parameters": rope,
        "dtype": dtype,
    }
    if model_cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = dict(rope)  # transformers 4.x reads this name
    if diffusion_cfg is not None:
        hf[OPDLM_KEY] = {
            "block_size": diffusion_cfg.block_size,
            "token_shift": diffusion_cfg.token_shift,
            "mask_token_id": model_cfg.student_mask_token_id,
            "vocab_size": model_cfg.vocab_size,  # tokenizer rows; the mask row may follow
            "mask_token_id_config": model_cfg.mask_token_id,
        }
    return hf


def export_vocab_rows(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig | None) -> int:
    """Embedding rows written to HF: real tokens, plus the added mask row for a student."""
    if diffusion_cfg is not None and model_cfg.adds_mask_row:
        return model_cfg.vocab_size + 1
    return model_cfg.vocab_size
