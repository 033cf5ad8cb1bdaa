"""HF <-> Megatron conversion in one process: stored layout, round trips, every input error.

Each error test also checks that nothing was written (errors come before work).
"""

from __future__ import annotations

import glob
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_opdlm.checkpoint_layout import MODEL_DIR, read_model_meta
from megatron_opdlm.conversion.dist_reader import DistCheckpointReader
from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron
from megatron_opdlm.conversion.megatron_to_hf import convert_megatron_to_hf
from megatron_opdlm.conversion.synthetic import save_tiny_hf


def _hf_tensors(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in glob.glob(f"{directory}/*.safetensors"):
        tensors.update(load_file(path))
    return tensors


def _stored(ckpt, key) -> torch.Tensor:
    """Assemble a whole stored tensor from its chunks (test sizes only)."""
    with DistCheckpointReader(ckpt / MODEL_DIR) as reader:
        full = torch.empty(reader.shape(key), dtype=reader.dtype(key))
        for offsets, data in reader.chunks(key):
            full[tuple(slice(o, o + s) for o, s in zip(offsets, data.shape))] = data
    return full


@pytest.fixture(scope="module")
def llama_hf(tmp_path_factory):
    return save_tiny_hf("llama", tmp_path_factory.mktemp("llama") / "hf")


def test_stored_layout_qkv_gate_up_padding_and_mask_row(llama_hf, tmp_path):
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(llama_hf, ckpt, max_chunk_mb=0.003)  # several chunks per tensor
    hf = _hf_tensors(llama_hf)
    cfg, diffusion = read_model_meta(ckpt)
    assert diffusion is None and cfg.family == "llama"
    h, d, layers = cfg.hidden_size, cfg.kv_channels, cfg.num_layers
    qkv = _stored(ckpt, "decoder.layers.self_attention.linear_qkv.weight")  # [L, (nq+2g)d, h]
    fc1 = _stored(ckpt, "decoder.layers.mlp.linear_fc1.weight")  # [L, 2f, h]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups = qkv[i].view(2, 4 * d, h)  # 2 groups of [2 q heads; k; v]
        assert torch.equal(groups[:, : 2 * d].reshape(-1, h), hf[p + "self_attn.q_proj.weight"])
        assert torch.equal(
            groups[:, 2 * d : 3 * d].reshape(-1, h), hf[p + "self_attn.k_proj.weight"]
        )
        assert torch.equal(groups[:, 3 * d :].reshape(-1, h), hf[p + "self_attn.v_proj.weight"])
        gate_up = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        assert torch.equal(fc1[i], gate_up)
    emb = _stored(ckpt, "embedding.word_embeddings.weight")  # [V, h]
    real = hf["model.embed_tokens.weight"]
    assert emb.shape[0] == cfg.padded_vocab_size == 256
    assert torch.equal(emb[: cfg.vocab_size], real)
    assert torch.allclose(emb[cfg.vocab_size].double(), real.double().mean(0), atol=1e-7)
    assert not emb[cfg.vocab_size + 1 :].any()
    out = _stored(ckpt, "output_layer.weight")
    assert torch.equal(out[: cfg.vocab_size], hf["lm_head.weight"])
    assert not out[cfg.vocab_size :].any()  # the output layer gets no mask row
    assert (ckpt / "opdlm_model.yaml").is_file() and not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_round_trip_is_bit_identical(family, dtype, tmp_path):
    hf_dir = save_tiny_hf(family, tmp_path / "hf")
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt", dtype=dtype, max_chunk_mb=0.01)
    convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_gb=100 / 2**20)
    source, back = _hf_tensors(hf_dir), _hf_tensors(tmp_path / "back")
    assert sorted(source) == sorted(back)
    for name, tensor in source.items():
        expected = tensor if dtype is None else tensor.to(torch.bfloat16)
        assert back[name].dtype == expected.dtype and torch.equal(back[name], expected), name
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(source)  # several shards, all indexed
    assert len(set(index["weight_map"].values())) > 1


def test_student_export_keeps_mask_row_and_reloads(llama_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_opdlm.checkpoint_layout import write_model_meta
    from megatron_opdlm.config import DiffusionConfig

    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(llama_hf, ckpt)
    cfg, _ = read_model_meta(ckpt)
    write_model_meta(ckpt, cfg, DiffusionConfig(block_size=4, token_shift=False))  # a "student"
    convert_megatron_to_hf(ckpt, tmp_path / "student")
    exported = _hf_tensors(tmp_path / "student")
    emb = _stored(ckpt, "embedding.word_embeddings.weight")
    assert torch.equal(exported["model.embed_tokens.weight"], emb[: cfg.vocab_size + 1])
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    decoding = config["opdlm"].pop("decoding")
    assert config["opdlm"] == {
        "block_size": 4, "token_shift": False, "mask_token_id": cfg.vocab_size,
        "vocab_size": cfg.vocab_size, "mask_token_id_config": None, "family": "llama",
    }  # fmt: skip
    assert decoding["remasking"] == "static" and decoding["steps_per_block"] == 4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student", trust_remote_code=True)
    assert model.get_input_embeddings().weight.shape[0] == cfg.vocab_size + 1
    # and it converts back into the same Megatron checkpoint layout
    convert_hf_to_megatron(tmp_path / "student", tmp_path / "again")
    again_cfg, again_diffusion = read_model_meta(tmp_path / "again")
    assert again_cfg == cfg and again_diffusion == DiffusionConfig(block_size=4)
    assert torch.equal(_stored(tmp_path / "again", "embedding.word_embeddings.weight"), emb)


# ---------------------------------------------------------------- errors, before any work


def _expect_error(hf_dir, out, match, **kwargs):
    with pytest.raises(ValueError, match=match):
        convert_hf_to_megatron(hf_dir, out, **kwargs)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def _edit_config(hf_dir, **changes):
    path = hf_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(hf_dir, drop=(), add=None, replace=None):
    tensors = _hf_tensors(hf_dir)
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    tensors.update(replace or {})
    for path in glob.glob(f"{hf_dir}/*.safetensors"):
        __import__("os").remove(path)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


def test_error_unknown_architecture(tmp_path):
    hf_dir = save_tiny_hf("llama", tmp_path / "hf")
    _edit_config(hf_dir, architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    _expect_error(
        hf_dir, tmp_path / "out", r"unsupported architecture.*supported: LlamaForCausalLM"
    )


def test_error_missing_extra_and_misshaped_tensors(tmp_path):
    hf_dir = save_tiny_hf("llama", tmp_path / "hf")
    _edit_tensors(
        hf_dir,
        drop=["model.layers.2.mlp.up_proj.weight"],
        add={"model.layers.0.self_attn.extra.weight": torch.zeros(2, 2)},
        replace={"model.layers.1.self_attn.k_proj.weight": torch.zeros(16, 64)},
    )
    _expect_error(
        hf_dir, tmp_path / "out",
        r"missing tensors \['model.layers.2.mlp.up_proj.weight'\].*unexpected tensors "
        r"\['model.layers.0.self_attn.extra.weight'\].*model.layers.1.self_attn.k_proj.weight: "
        r"\(16, 64\) \(expected \(32, 64\)\)",
    )  # fmt: skip


def test_error_layouts_that_do_not_divide(tmp_path):
    hf_dir = save_tiny_hf("llama", tmp_path / "hf")  # 4 heads, 2 kv heads, 4 layers
    out = tmp_path / "out"
    _expect_error(hf_dir, out, r"num_attention_heads=4 is not divisible by parallel.tp=8", tp=8)
    _expect_error(hf_dir, out, r"num_query_groups=2 \(kv heads\) is not divisible by parallel.tp=4",
                  tp=4)  # fmt: skip
    _expect_error(hf_dir, out, r"num_layers=4 is not divisible by parallel.pp=3", pp=3)
    _expect_error(hf_dir, out, r"parallel.pp=2 x parallel.vpp=4 = 8", pp=2, vpp=4)
    _expect_error(hf_dir, out, r"padded vocabulary 201 .* not divisible by parallel.tp=2",
                  tp=2, vocab_pad_multiple=1)  # fmt: skip


def test_error_output_exists_and_not_an_hf_dir(tmp_path):
    hf_dir = save_tiny_hf("llama", tmp_path / "hf")
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="output directory .*out exists"):
        convert_hf_to_megatron(hf_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="not a Hugging Face model directory \\(no config.json\\)"):
        convert_hf_to_megatron(tmp_path / "out", tmp_path / "other")


def test_export_errors(llama_hf, tmp_path):
    with pytest.raises(ValueError, match="is not a megatron-opdlm checkpoint"):
        convert_megatron_to_hf(llama_hf, tmp_path / "out")
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(llama_hf, ckpt)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="output directory .*exists exists"):
        convert_megatron_to_hf(ckpt, tmp_path / "exists")
    meta = (ckpt / "opdlm_model.yaml").read_text()
    (ckpt / "opdlm_model.yaml").write_text(
        meta.replace("tie_word_embeddings: false", "tie_word_embeddings: true")
    )
    with pytest.raises(ValueError, match=r"unexpected \['output_layer.weight'\]"):
        convert_megatron_to_hf(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mean_row_is_exact_in_any_write_order(llama_hf):
    from megatron_opdlm.conversion.hf_to_megatron import _MeanRow
    from megatron_opdlm.conversion.safetensors_io import SafetensorsReader

    name = "model.embed_tokens.weight"
    expected = _hf_tensors(llama_hf)[name].double().mean(0)
    with SafetensorsReader(llama_hf) as reader:
        seen_some = _MeanRow(reader, name, 200)
        seen_some.add(50, reader.read_rows(name, 50, 120))  # rows 0-49 and 120-199 unseen
        assert torch.allclose(seen_some.value(), expected, rtol=0, atol=1e-12)
        assert torch.allclose(_MeanRow(reader, name, 200).value(), expected, rtol=0, atol=1e-12)
