"""Small random HF models of every supported family (tests) and large synthetic checkpoints with
real model shapes written tensor by tensor (benchmarks), without downloading anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Each tiny family exercises what sets it apart: Llama-3 RoPE scaling, Qwen2 q/k/v bias (tied
# embeddings, like Qwen2.5 small models), Qwen3 q/k norm with head_dim != hidden / heads,
# Mistral's sliding window (longer than the test sequences).
TINY_BASE = dict(
    vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    initializer_range=0.2, rms_norm_eps=1e-6, eos_token_id=1, pad_token_id=0,
)  # fmt: skip
TINY_FAMILIES = {
    "llama": dict(
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),  # fmt: skip
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=24),
    "mistral": dict(sliding_window=128),
}


def tiny_hf_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised fp32 transformers model of `family` (eager attention)."""
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
    }
    config_cls, model_cls = (getattr(transformers, name) for name in classes[family])
    kwargs = {**TINY_BASE, **TINY_FAMILIES[family], **overrides}
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    model = model_cls(config).float().eval()
    if family == "qwen2":  # biases are zero-initialised: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0.0, 0.5)
    if family == "qwen3":  # q/k norm weights start at one: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    return model


def save_tiny_hf(family: str, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    model = tiny_hf_model(family, seed, **overrides)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=8192,
)  # fmt: skip


def write_synthetic_llama(
    out_dir: str | Path,
    num_layers: int,
    shape: dict | None = None,
    dtype=torch.bfloat16,
    layers_per_shard: int = 2,
    seed: int = 0,
) -> int:
    """An HF Llama directory with `shape` (default Llama-3-8B) and random weights, written one
    tensor at a time (bounded memory); returns the safetensors bytes."""
    from safetensors.torch import save_file

    shape = {**LLAMA3_8B, **(shape or {})}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    gen = torch.Generator().manual_seed(seed)

    def rand(*size):
        return (torch.randn(*size, generator=gen) * 0.02).to(dtype)

    groups: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(v, h)}]
    weight_map, total, shard = {}, 0, 0
    files = []

    def flush(tensors):
        nonlocal shard, total
        name = f"model-{shard:05d}.safetensors"
        save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
        files.append(name)
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.itemsize
        shard += 1

    flush(groups.pop())
    for start in range(0, num_layers, layers_per_shard):
        tensors = {}
        for i in range(start, min(num_layers, start + layers_per_shard)):
            p = f"model.layers.{i}."
            tensors.update({
                p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
                p + "mlp.down_proj.weight": rand(h, f),
            })  # fmt: skip
        flush(tensors)
        del tensors
    flush({"model.norm.weight": torch.ones(h, dtype=dtype), "lm_head.weight": rand(v, h)})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "num_hidden_layers": num_layers, "tie_word_embeddings": False,
        "eos_token_id": v - 255, "bos_token_id": v - 256,  # Llama 3: 128001 / 128000
        "dtype": str(dtype).removeprefix("torch."), **shape,
    }  # fmt: skip
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total
