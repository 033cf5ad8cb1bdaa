"""config.json <-> ModelConfig, family detection, mapping geometry (no model, no files)."""

from __future__ import annotations

import pytest
import torch

from megatron_opdlm.config import DiffusionConfig
from megatron_opdlm.conversion.families import mappings_for
from megatron_opdlm.conversion.hf_config import (
    diffusion_config_from_hf,
    hf_config_from_model,
    model_config_from_hf,
)
from megatron_opdlm.conversion.mappings import Dims, FusedQKV, Vocab
from megatron_opdlm.conversion.synthetic import tiny_hf_model


def _hf(family: str, **overrides) -> dict:
    return {**tiny_hf_model(family).config.to_dict(), **overrides}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_family_detection_and_fields(family):
    cfg = model_config_from_hf(_hf(family))
    assert cfg.family == family
    assert cfg.num_layers == 4 and cfg.hidden_size == 64 and cfg.ffn_hidden_size == 96
    assert cfg.num_attention_heads == 4 and cfg.num_query_groups == 2
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.qk_layernorm == (family == "qwen3")
    assert cfg.kv_channels == (24 if family == "qwen3" else 16)
    assert cfg.tie_word_embeddings == (family == "qwen2")
    assert cfg.padded_vocab_size % 128 == 0 and cfg.padded_vocab_size > cfg.vocab_size


def test_llama3_rope_scaling_is_read():
    cfg = model_config_from_hf(_hf("llama"))
    assert cfg.rope_scaling == "llama3" and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling_factor == 8.0 and cfg.rope_original_max_position_embeddings == 64


def test_vocab_padding_divides_by_tp():
    cfg = model_config_from_hf(_hf("llama"), tp=3)
    assert cfg.padded_vocab_size % 3 == 0 and cfg.padded_vocab_size % 128 == 0


def test_unsupported_architecture_lists_supported():
    with pytest.raises(
        ValueError,
        match=r"unsupported architecture.*GPT2LMHeadModel.*supported: "
        r"LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM",
    ):
        model_config_from_hf(_hf("llama", architectures=["GPT2LMHeadModel"]))


def test_unsupported_rope_scaling_and_biases():
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported"):
        model_config_from_hf(_hf("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="attention_bias=true"):
        model_config_from_hf(_hf("llama", attention_bias=True))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        model_config_from_hf(_hf("llama", hidden_act="gelu"))


def test_mistral_sliding_window_caps_positions():
    cfg = model_config_from_hf(_hf("mistral", sliding_window=100, max_position_embeddings=256))
    assert cfg.max_position_embeddings == 100


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_exported_config_reads_back(family):
    cfg = model_config_from_hf(_hf(family))
    again = model_config_from_hf(hf_config_from_model(cfg))
    assert again == cfg
    assert diffusion_config_from_hf(hf_config_from_model(cfg)) is None


def test_student_export_records_diffusion_settings():
    cfg = model_config_from_hf(_hf("llama"))
    diffusion = DiffusionConfig(block_size=8, token_shift=True)
    hf = hf_config_from_model(cfg, diffusion)
    assert hf["vocab_size"] == cfg.vocab_size + 1  # the added mask row is kept
    assert hf["opdlm"]["mask_token_id"] == cfg.vocab_size
    assert hf["opdlm"]["block_size"] == 8 and hf["opdlm"]["token_shift"] is True
    assert model_config_from_hf(hf) == cfg
    assert diffusion_config_from_hf(hf) == diffusion


def test_fused_qkv_rows_interleave_per_query_group():
    cfg = model_config_from_hf(_hf("qwen3"))  # 4 heads, 2 groups, head_dim 24
    dims = Dims(cfg, cfg.vocab_size)
    h, d = cfg.hidden_size, cfg.kv_channels
    q, k, v = torch.randn(4 * d, h), torch.randn(2 * d, h), torch.randn(2 * d, h)
    expected = torch.cat([q.view(2, 2 * d, h), k.view(2, d, h), v.view(2, d, h)], dim=1).reshape(
        -1, h
    )  # reference: Megatron's [q_g; k_g; v_g] per group
    mapping = FusedQKV("decoder.layers.self_attention.linear_qkv.weight", ("q", "k", "v"))
    built = torch.empty(mapping.shape(dims))
    for seg in mapping.segments(dims):
        source = (q, k, v)[seg.source]
        built[seg.start : seg.stop] = source[seg.hf_start : seg.hf_start + seg.stop - seg.start]
    assert torch.equal(built, expected)


def test_vocab_segments_add_mean_row_then_zero_padding():
    cfg = model_config_from_hf(_hf("llama"))
    dims = Dims(cfg, cfg.vocab_size)
    emb = Vocab("embedding.word_embeddings.weight", ("e",), mask_row_mean=True).segments(dims)
    assert [(s.start, s.stop, s.source, s.fill) for s in emb] == [
        (0, 200, 0, "zero"), (200, 201, None, "mean"), (201, 256, None, "zero")
    ]  # fmt: skip
    out = Vocab("output_layer.weight", ("o",)).segments(dims)
    assert [(s.start, s.stop, s.source) for s in out] == [(0, 200, 0), (200, 256, None)]


def test_mappings_follow_the_config():
    keys = lambda family: {m.megatron for m in mappings_for(model_config_from_hf(_hf(family)))}
    assert "decoder.layers.self_attention.linear_qkv.bias" in keys("qwen2")
    assert "output_layer.weight" not in keys("qwen2")  # tied
    assert "decoder.layers.self_attention.q_layernorm.weight" in keys("qwen3")
    assert "output_layer.weight" in keys("llama")
    assert not any("bias" in k or "q_layernorm" in k for k in keys("llama"))
