"""Tiny model configs and students shared by the tests."""

from __future__ import annotations

import contextlib

import torch

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


def sharp_student(config) -> list[torch.nn.Module]:
    """The student of `config` from seed 0 (distributed initialised for its layout), output layer
    x30: sharper distributions, like a trained model (confidences up to 0.95), so decisions sit
    far from ties."""
    from megatron_opdlm.models.builder import build_student

    torch.manual_seed(0)
    chunks = build_student(config)
    with torch.no_grad():
        chunks[0].output_layer.weight.mul_(30.0)
    return chunks


@contextlib.contextmanager
def tiny_student(*overrides: str):
    """(config, chunks): a one-process sharp tiny student (tiny_config with `overrides`), with
    distributed initialised (seed 1234) for the block and shut down after. For module fixtures:
    `with tiny_student(...) as student: yield student`."""
    from megatron_opdlm.runtime import distributed

    config = tiny_config(*overrides)
    distributed.initialize(config.parallel, seed=1234)
    try:
        yield config, sharp_student(config)
    finally:
        distributed.shutdown()
