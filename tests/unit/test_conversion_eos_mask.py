"""EOS ids from generation_config.json, a missing EOS refused, and --mask-token-id (an unused
vocabulary row as the student's mask token) at conversion."""

from __future__ import annotations

import json

import pytest

from megatron_opdlm.conversion.hf_config import model_config_from_hf
from megatron_opdlm.conversion.synthetic import save_tiny_hf, tiny_hf_model


def _hf(**overrides) -> dict:
    return {**tiny_hf_model("llama").config.to_dict(), **overrides}


def test_generation_config_eos_list_comes_first():
    """Llama-3-Instruct: config.json says 128001 (<|end_of_text|>), generation_config.json lists
    [128001, 128009]; 128009 (<|eot_id|>) is what ends an assistant turn."""
    hf = _hf(vocab_size=128256, eos_token_id=128001)
    cfg = model_config_from_hf(hf, generation_config={"eos_token_id": [128001, 128009]})
    assert cfg.eos_token_ids == [128001, 128009]
    cfg = model_config_from_hf(_hf(eos_token_id=3), generation_config={"eos_token_id": 7})
    assert cfg.eos_token_ids == [7, 3]


def test_missing_eos_is_an_error():
    with pytest.raises(ValueError, match="no eos_token_id"):
        model_config_from_hf(_hf(eos_token_id=None))


def test_converter_reads_generation_config_and_mask_token_id(tmp_path):
    from megatron_opdlm.conversion.hf_to_megatron import plan_conversion

    hf_dir = save_tiny_hf("llama", tmp_path / "hf")
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    cfg, _ = plan_conversion(hf_dir)
    assert cfg.eos_token_ids[:2] == [2, 9] and cfg.mask_token_id is None
    cfg, _ = plan_conversion(hf_dir, mask_token_id=vocab - 1)  # no tokenizer: not checked
    assert cfg.mask_token_id == vocab - 1 and not cfg.adds_mask_row
    assert cfg.padded_vocab_size == -(-vocab // 128) * 128
