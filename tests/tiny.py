"""Tiny model configs shared by the tests."""

from __future__ import annotations

from megatron_opdlm.config import load_config


def tiny_config(*overrides: str):
    """A tiny Llama-style job config (fp32, local spec) with overrides."""
    base = [
        "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=120",
        "model.vocab_pad_multiple=8", "model.eos_token_ids=[1]", "model.pad_token_id=0",
        "precision.transformer_impl=local",
    ]  # fmt: skip
    return load_config(None, base + list(overrides))
