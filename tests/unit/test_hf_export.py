"""The HF export of a student as a DLM, on tiny models of every family (one process, CPU).

- config.json declares the student's own model_type / architecture with auto_map, the `opdlm`
  section (block size, mask id, token shift, decoding defaults); the remote code and a model card
  are in the directory; tensor names and shapes are the family's.
- loading without trust_remote_code raises; with it, generate() decodes block-wise with the same
  tokens as the Megatron sampler (greedy static / dynamic, sampled with a seeded generator,
  cache and no cache, token shift on and off, ragged left-padded batches) and the same logits.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from megatron_opdlm.checkpoint_layout import (
    load_model_checkpoint,
    read_model_meta,
    write_model_meta,
)
from megatron_opdlm.config import (
    DiffusionConfig,
    JobConfig,
    ParallelConfig,
    PrecisionConfig,
    RolloutConfig,
)
from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron
from megatron_opdlm.conversion.megatron_to_hf import convert_megatron_to_hf
from megatron_opdlm.conversion.synthetic import save_tiny_hf

PROMPTS = [[5, 17, 42, 9, 33, 8, 21], [7, 3], [60, 61, 62, 63, 64], [11]]


def _student(tmp_path, family: str, token_shift: bool, block_size: int = 4):
    hf_dir = save_tiny_hf(family, tmp_path / "hf")
    ckpt = tmp_path / "ckpt"
    convert_hf_to_megatron(hf_dir, ckpt)
    model_cfg, _ = read_model_meta(ckpt)
    diffusion = DiffusionConfig(block_size=block_size, token_shift=token_shift)
    write_model_meta(ckpt, model_cfg, diffusion)  # a student with 0 training steps
    out = tmp_path / "dlm"
    convert_megatron_to_hf(ckpt, out)
    return ckpt, out, model_cfg, diffusion


@pytest.fixture(scope="module")
def megatron_state():
    from megatron_opdlm.runtime import distributed

    distributed.initialize(ParallelConfig(), seed=0)
    yield
    distributed.shutdown()


def _megatron_chunks(ckpt, model_cfg, diffusion):
    from megatron_opdlm.models.builder import build_student

    job = JobConfig(
        model=model_cfg, diffusion=diffusion, precision=PrecisionConfig(transformer_impl="local")
    )
    chunks = build_student(job)
    load_model_checkpoint(chunks, ckpt)
    return chunks


def _megatron_generate(chunks, model_cfg, diffusion, rollout, max_new, seed=None):
    from megatron_opdlm.diffusion.sampler import generate

    rounds = []
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    batch = generate(chunks, PROMPTS, model_cfg, diffusion, rollout, max_new, generator=generator,
                     round_callback=lambda *a: rounds.append(a))  # fmt: skip
    rows = []
    for row in range(len(PROMPTS)):
        length = int(batch.response_valid[row].sum())
        rows.append(batch.response_tokens[row, :length].tolist())
    return rows, batch, rounds


def _hf_inputs(pad_id):
    width = max(len(p) for p in PROMPTS)
    ids = torch.full((len(PROMPTS), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _hf_rows(out, prompt_width, pad_id, eos_ids):
    rows = []
    for seq in out.sequences[:, prompt_width:].tolist():
        row = []
        for t in seq:
            row.append(t)
            if t in eos_ids:
                break
        while row and row[-1] == pad_id and pad_id not in eos_ids:
            row.pop()
        rows.append(row)
    return rows


def test_export_declares_a_dlm_and_keeps_native_tensors(tmp_path):
    ckpt, out, model_cfg, _ = _student(tmp_path, "qwen3", token_shift=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "opdlm_qwen3"
    assert config["architectures"] == ["OpdlmQwen3ForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_opdlm.OpdlmQwen3ForCausalLM"
    opdlm = config["opdlm"]
    assert (opdlm["block_size"], opdlm["token_shift"], opdlm["mask_token_id"]) == (
        4, True, model_cfg.vocab_size)  # fmt: skip
    assert opdlm["decoding"]["remasking"] == "static" and opdlm["decoding"]["steps_per_block"] == 4
    for name in ("modeling_opdlm.py", "configuration_opdlm.py", "generation_opdlm.py",
                 "block_diffusion.py", "README.md"):  # fmt: skip
        assert (out / name).is_file(), name
    native = load_file(tmp_path / "hf" / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert set(exported) == set(native)
    for name, tensor in native.items():
        rows = tensor.shape[0] + 1 if name in ("model.embed_tokens.weight", "lm_head.weight") else 0
        assert exported[name].shape == ((rows, *tensor.shape[1:]) if rows else tensor.shape)
    # and the DLM directory converts back to the same Megatron layout
    convert_hf_to_megatron(out, tmp_path / "again")
    again_cfg, again_diffusion = read_model_meta(tmp_path / "again")
    assert again_cfg == model_cfg and again_diffusion == DiffusionConfig(4, True)


def test_loading_without_trust_remote_code_raises(tmp_path):
    from transformers import AutoModelForCausalLM

    _, out, _, _ = _student(tmp_path, "llama", token_shift=False)
    with pytest.raises(ValueError, match="trust_remote_code|opdlm_llama"):
        AutoModelForCausalLM.from_pretrained(out)


def test_decoding_defaults_are_checked(tmp_path):
    hf_dir = save_tiny_hf("llama", tmp_path / "hf")
    convert_hf_to_megatron(hf_dir, tmp_path / "ckpt")
    cfg, _ = read_model_meta(tmp_path / "ckpt")
    write_model_meta(tmp_path / "ckpt", cfg, DiffusionConfig(block_size=4))
    with pytest.raises(ValueError, match="steps-per-block 5"):
        convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "o", decoding={"steps_per_block": 5})
    assert not (tmp_path / "o").exists()


CASES = [  # family, token shift, remasking, cache, temperature
    ("llama", True, "static", True, 0.0),
    ("llama", True, "dynamic", False, 0.0),
    ("qwen2", False, "dynamic", True, 0.0),
    ("qwen3", False, "static", False, 0.0),
    ("mistral", True, "static", True, 0.9),
]


@pytest.mark.parametrize("family,shift,remasking,cache,temperature", CASES)
def test_generate_matches_megatron_sampler(
    tmp_path, megatron_state, family, shift, remasking, cache, temperature
):
    from transformers import AutoModelForCausalLM

    ckpt, out, model_cfg, diffusion = _student(tmp_path, family, token_shift=shift)
    chunks = _megatron_chunks(ckpt, model_cfg, diffusion)
    rollout = RolloutConfig(steps_per_block=4, remasking=remasking, threshold=0.3,
                            temperature=temperature, top_k=20 if temperature else 0,
                            top_p=0.9 if temperature else 1.0, use_kv_cache=cache)  # fmt: skip
    expected, batch, rounds = _megatron_generate(chunks, model_cfg, diffusion, rollout, 12, seed=3)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    ids, mask = _hf_inputs(model_cfg.pad_token_id)
    sample = (
        dict(do_sample=True, temperature=temperature, top_k=20, top_p=0.9) if temperature else {}
    )
    got = model.generate(
        ids, attention_mask=mask, max_new_tokens=12, remasking=remasking, threshold=0.3,
        use_cache=cache, return_dict_in_generate=True, output_logits=True,
        generator=torch.Generator().manual_seed(3), **sample,
    )  # fmt: skip
    rows = _hf_rows(got, ids.shape[1], model_cfg.pad_token_id, model_cfg.eos_token_ids)
    assert rows == expected
    assert torch.equal(got.num_forwards, batch.num_forwards)
    # logits of the round that unmasked each token: Megatron's from the round callback
    v, compared = model_cfg.vocab_size, 0
    assert sum(len(r) for r in expected) >= 12  # random tiny models rarely stop at once
    for block, _, logits, _, masked, select in rounds:
        for row, pos in torch.nonzero(select & masked).tolist():
            column = block * 4 + pos
            if column >= len(expected[row]):
                continue
            # fp32, 4 layers, logits of magnitude ~5: the two implementations sum in different
            # orders (fused QKV, fused gate/up), ~1e-6 apart; 1e-4 leaves margin
            torch.testing.assert_close(
                got.logits[column][row, :v], logits[row, pos, :v], rtol=0, atol=1e-4
            )
            compared += 1
    assert compared == sum(len(r) for r in expected)


def test_generate_outputs_and_stops(tmp_path, megatron_state):
    from transformers import AutoModelForCausalLM

    _, out, model_cfg, _ = _student(tmp_path, "llama", token_shift=True)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    ids, mask = _hf_inputs(model_cfg.pad_token_id)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert plain.shape[0] == 4 and plain.shape[1] <= ids.shape[1] + 10  # cut inside a block
    longer = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(longer[:, : plain.shape[1]], plain) or plain.shape[1] < ids.shape[1] + 10

    calls = []

    def stop_after_first_block(sequences, scores):
        calls.append(sequences.shape[1])
        return torch.ones(sequences.shape[0], dtype=torch.bool)

    stopped = model.generate(ids, attention_mask=mask, max_new_tokens=12,
                             stopping_criteria=stop_after_first_block)  # fmt: skip
    assert calls == [ids.shape[1] + 4] and stopped.shape[1] <= ids.shape[1] + 4
    right = torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="left padding"):
        model.generate(right[0], attention_mask=right[1])
    with pytest.raises(ValueError, match="mask token"):
        model.generate(torch.tensor([[5, model_cfg.vocab_size]]))

    class Recorder:
        def __init__(self):
            self.puts = []

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.puts.append("end")

    recorder = Recorder()
    one = model.generate(ids[1:2, -2:], max_new_tokens=8, streamer=recorder)
    assert recorder.puts[0] == [[7, 3]] and recorder.puts[-1] == "end"
    assert sum((p for p in recorder.puts[1:-1]), []) == one[0, 2:].tolist()


def test_remote_code_matches_project_functions():
    """The remote code's copies of the sampler's pure functions agree with the project's."""
    from megatron_opdlm.diffusion.remasking import dynamic_remasking, static_remasking
    from megatron_opdlm.diffusion.sampling import propose_tokens
    from megatron_opdlm.hf_export.remote_code import block_diffusion as remote
    from megatron_opdlm.models.masks import block_diffusion_mask

    g = torch.Generator().manual_seed(0)
    settings = remote.DecodeSettings(4, False, 0, 50, 3, "static", 0.4, 0.8, 5, 0.9, True)
    rollout = RolloutConfig(steps_per_block=3, threshold=0.4, temperature=0.8, top_k=5, top_p=0.9)
    logits, uniform = torch.randn(32, 50, generator=g), torch.rand(32, generator=g)
    tokens, confidence, _ = remote.propose(logits, settings, uniform)
    expected_tokens, expected_confidence = propose_tokens(logits, rollout, uniform)
    assert torch.equal(tokens, expected_tokens) and torch.equal(confidence, expected_confidence)
    conf = torch.rand(8, 4, generator=g)
    masked = torch.rand(8, 4, generator=g) > 0.3
    for r in range(3):
        assert torch.equal(remote.remask(conf, masked, r, settings),
                           static_remasking(conf, masked, r, 3, rollout))  # fmt: skip
        dynamic = dataclasses.replace(settings, remasking="dynamic")
        assert torch.equal(remote.remask(conf, masked, r, dynamic),
                           dynamic_remasking(conf, masked, r, 3, rollout))  # fmt: skip
    blocks = torch.randint(-2, 3, (2, 9), generator=g)
    noisy, valid = torch.rand(2, 9, generator=g) > 0.5, torch.rand(2, 9, generator=g) > 0.2
    assert torch.equal(
        remote.block_diffusion_mask(blocks[:, 3:], noisy[:, 3:], blocks, noisy, valid, 3),
        block_diffusion_mask(blocks[:, 3:], noisy[:, 3:], blocks, noisy, valid, 3),
    )
