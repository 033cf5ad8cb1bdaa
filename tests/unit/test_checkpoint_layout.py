"""The checkpoint directory contract (save/load/meta/latest) and --verify, in one process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_opdlm import checkpoint_layout
from megatron_opdlm.checkpoint_layout import (
    load_model_checkpoint,
    read_model_meta,
    resolve_checkpoint_dir,
    save_model_checkpoint,
)
from megatron_opdlm.config import JobConfig
from megatron_opdlm.conversion.dist_writer import write_torch_dist
from megatron_opdlm.conversion.families import mappings_for
from megatron_opdlm.conversion.hf_to_megatron import build_lazy_state, convert_hf_to_megatron
from megatron_opdlm.conversion.mappings import Dims
from megatron_opdlm.conversion.safetensors_io import SafetensorsReader
from megatron_opdlm.conversion.synthetic import save_tiny_hf
from megatron_opdlm.conversion.verify import verify_conversion
from megatron_opdlm.models.builder import build_student, build_teacher
from tests.tiny import tiny_config


def _params(chunks) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in chunks[0].state_dict().items() if torch.is_tensor(v)}


def test_save_load_round_trip_with_meta_and_tokenizer(single_process, tmp_path):
    config = tiny_config("model.qk_layernorm=true", "model.tie_word_embeddings=true")
    source = build_student(config)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    (tokenizer / "tokenizer_config.json").write_text("{}")
    ckpt = tmp_path / "ckpt"
    save_model_checkpoint(source, ckpt, config.model, config.diffusion, tokenizer_dir=tokenizer)
    assert sorted(p.name for p in (ckpt / "tokenizer").iterdir()) == [
        "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    assert read_model_meta(ckpt) == (config.model, config.diffusion)
    torch.manual_seed(999)  # a different random init: the load must overwrite every tensor
    target = build_student(config)
    assert any(
        not torch.equal(a, b) for a, b in zip(_params(source).values(), _params(target).values())
    )
    load_model_checkpoint(target, ckpt)
    for (name, a), b in zip(_params(source).items(), _params(target).values()):
        assert torch.equal(a, b), name
    # saving again over it replaces it atomically
    save_model_checkpoint(target, ckpt, config.model, None)
    assert read_model_meta(ckpt) == (config.model, None)
    assert not list(tmp_path.glob(".ckpt*"))


def test_resolve_latest_and_meta_errors(tmp_path):
    save = tmp_path / "save"
    (save / "iter_0000010").mkdir(parents=True)
    (save / "latest").write_text("iter_0000010\n")
    assert resolve_checkpoint_dir(save) == save / "iter_0000010"
    assert resolve_checkpoint_dir(save / "iter_0000010") == save / "iter_0000010"
    with pytest.raises(ValueError, match="is not a megatron-opdlm checkpoint \\(no opdlm_model"):
        read_model_meta(save)
    (save / "latest").write_text("iter_0000020")
    with pytest.raises(ValueError, match="names 'iter_0000020', which is not a directory"):
        resolve_checkpoint_dir(save)
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "opdlm_model.yaml").write_text("format_version: 2\nmodel: {}\n")
    with pytest.raises(ValueError, match="format_version=2, this code reads version 1"):
        read_model_meta(tmp_path / "v2")


def test_load_rejects_other_architecture_and_missing_tensors(single_process, tmp_path):
    hf_dir = save_tiny_hf("llama", tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(hf_dir, ckpt)
    model_cfg, _ = read_model_meta(ckpt)
    wrong = JobConfig(model=model_cfg)
    wrong.model = type(model_cfg)(**{**vars(model_cfg), "ffn_hidden_size": 128})
    with pytest.raises(ValueError, match="ffn_hidden_size: model 128 vs checkpoint 96"):
        load_model_checkpoint(build_teacher(wrong), ckpt)
    # a checkpoint that lacks one tensor: named in the error
    with SafetensorsReader(hf_dir) as reader:
        mappings = mappings_for(model_cfg)
        state = build_lazy_state(reader, mappings, Dims(model_cfg, 200), torch.float32, 2**20)
        del state["decoder.final_layernorm.weight"]
        partial = tmp_path / "partial"
        write_torch_dist(state, partial / "model")
    checkpoint_layout.write_model_meta(partial, model_cfg, None)
    with pytest.raises(ValueError, match=r"missing in the checkpoint \['decoder.final_layernorm"):
        load_model_checkpoint(build_teacher(JobConfig(model=model_cfg)), partial)


def test_verify_passes_and_catches_a_wrong_weight(tmp_path):
    hf_dir = save_tiny_hf("qwen3", tmp_path / "hf")
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt")
    metrics = verify_conversion(hf_dir, tmp_path / "ckpt")
    assert metrics["passed"] and metrics["mean_kl"] <= 1e-6, metrics
    # the same checkpoint against an HF model with one perturbed weight must fail
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.self_attn.k_norm.weight"] *= 3.0
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    metrics = verify_conversion(hf_dir, tmp_path / "ckpt")
    assert not metrics["passed"] and metrics["mean_kl"] > 1e-6, metrics


def test_cli_exit_codes(tmp_path, capsys):
    from megatron_opdlm.conversion.cli import hf_to_megatron_main, megatron_to_hf_main

    hf_dir = save_tiny_hf("mistral", tmp_path / "hf")
    out = tmp_path / "ckpt"
    assert hf_to_megatron_main(["--hf-dir", str(hf_dir), "--out", str(out), "--verify",
                                "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "result" in printed and "PASS" in printed
    assert hf_to_megatron_main(["--hf-dir", str(hf_dir), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert megatron_to_hf_main(["--ckpt", str(out), "--out", str(tmp_path / "hf2"),
                                "--no-progress"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["model_type"] == "mistral"


def test_streaming_tensor_check_passes_and_catches_a_corrupted_tensor(tmp_path):
    from megatron_opdlm.conversion.verify import verify_tensors_streaming

    hf_dir = save_tiny_hf("llama", tmp_path / "hf")
    # 4 KiB chunks: every tensor is read in several pieces (rows and layers), as at 70B.
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt", max_chunk_mb=4 / 1024)
    result = verify_tensors_streaming(hf_dir, tmp_path / "ckpt")
    tensors = load_file(hf_dir / "model.safetensors")
    assert result["passed"], result["mismatches"]
    assert result["elements"] == sum(t.numel() for t in tensors.values())  # every HF element
    # Memory bound: the largest piece held is a chunk, smaller than one layer's MLP weight.
    assert (
        result["largest_chunk_elements"]
        <= 1024
        < tensors["model.layers.0.mlp.up_proj.weight"].numel()
    )
    tensors["model.layers.2.mlp.down_proj.weight"][5, 7] += 1e-3  # one corrupted element
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    result = verify_tensors_streaming(hf_dir, tmp_path / "ckpt")
    assert not result["passed"]
    assert (
        len(result["mismatches"]) == 1
        and "model.layers.2.mlp.down_proj.weight" in result["mismatches"][0]
    ), result["mismatches"]
