"""Teacher NLL, on-policy KL and decoding cost on tiny random Megatron models, each checked
against a reference computed another way (direct model calls, the formula in float64)."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_evaluation_support import random_prompts, tiny_eval_models


@pytest.fixture(scope="module")
def models():
    from megatron_opdlm.config import ParallelConfig
    from megatron_opdlm.runtime import distributed

    distributed.initialize(ParallelConfig(), seed=1234)
    teacher, student, job = tiny_eval_models(block_size=4)
    yield teacher, student, job
    distributed.shutdown()


def _rollout(model, prompts, name="static", max_new_tokens=12):
    from megatron_opdlm.evaluation import decoding

    setting = {s.name: s for s in decoding.decoding_settings(model)}[name]
    return decoding.generate_greedy(model, prompts, setting, max_new_tokens, len(prompts))


def _full_logits(chunks, tokens, mask, positions=None):
    if positions is None:
        positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return chunks[0](tokens, positions, mask).double()  # [b, s, V]


def _logp(logits, model_cfg):
    from megatron_opdlm.models.vocab import mask_invalid_logits

    return torch.log_softmax(mask_invalid_logits(logits, model_cfg), dim=-1)


def test_teacher_nll_matches_unpadded_forwards(models):
    from megatron_opdlm.evaluation.metrics import teacher_nll
    from megatron_opdlm.models.masks import causal_mask

    teacher, student, job = models
    batch = _rollout(student, random_prompts(3, seed=5)).batches[0]
    total, count = teacher_nll(teacher, batch)
    assert count == int(batch.response_valid.sum()) > 0
    expected = 0.0
    for i in range(batch.prompt_tokens.shape[0]):  # one row at a time, no padding at all
        prompt = batch.prompt_tokens[i][batch.prompt_valid[i]]
        response = batch.response_tokens[i][batch.response_valid[i]]
        tokens = torch.cat([prompt, response])[None]
        valid = torch.ones_like(tokens, dtype=torch.bool)
        logp = _logp(_full_logits(teacher.chunks, tokens, causal_mask(valid)), job.model)[0]
        columns = torch.arange(len(prompt) - 1, tokens.shape[1] - 1)
        expected -= logp[columns, response].sum().item()
    # fp32 forwards, left padding vs none: positions shift (RoPE is relative), sums of ~30 terms
    assert total == pytest.approx(expected, rel=1e-4)


def test_ar_teacher_scoring_itself_has_zero_kl(models):
    from megatron_opdlm.evaluation.metrics import onpolicy_kl

    teacher, _, _ = models
    batch = _rollout(teacher, random_prompts(3, seed=6), "ar").batches[0]
    total, count = onpolicy_kl(teacher, teacher, batch, torch.Generator().manual_seed(0))
    assert count > 0
    # block size 1 + token shift with the teacher's weights is the teacher (fp32 rounding only)
    assert abs(total) / count < 1e-6


def test_onpolicy_kl_matches_the_formula(models):
    from megatron_opdlm.evaluation.metrics import onpolicy_kl, onpolicy_states

    teacher, student, job = models
    batch = _rollout(student, random_prompts(4, seed=7)).batches[0]
    total, count = onpolicy_kl(teacher, student, batch, torch.Generator().manual_seed(3))
    packed = onpolicy_states(student, batch, torch.Generator().manual_seed(3))
    assert count == packed.num_loss_tokens > 0
    assert bool(packed.masked.any())
    p, r = packed.prompt_length, packed.response_length
    t_logp = _logp(
        _full_logits(teacher.chunks, packed.teacher_tokens, packed.teacher_attention_mask),
        job.model,
    )[:, p - 1 : p + r - 1]
    s_logp = _logp(
        _full_logits(student.chunks, packed.tokens, packed.attention_mask, packed.position_ids),
        job.model,
    )[:, packed.logit_columns]
    terms = t_logp.exp() * (t_logp - s_logp)  # [b, R, V]; -inf rows of both give nan
    kl = torch.nan_to_num(terms, nan=0.0).sum(-1)  # [b, R]
    expected = kl[packed.loss_mask].sum().item()
    assert expected > 0.1  # block attention on AR weights: far from the teacher
    assert total == pytest.approx(expected, rel=1e-4)  # fp32 model vs float64 formula


def test_tokens_per_forward_static_dynamic_ar(models):
    teacher, student, _ = models
    prompts = random_prompts(3, seed=8)
    ar = _rollout(teacher, prompts, "ar")
    assert ar.summary()["tokens_per_forward"] == 1.0
    static = _rollout(student, prompts, "static")
    assert static.forwards >= static.tokens  # one token per round (and EOS blocks finish)
    from megatron_opdlm.evaluation.decoding import DecodingSetting, generate_greedy

    anything = DecodingSetting("dynamic_1e-06", "dynamic", 1e-6)
    fast = generate_greedy(student, prompts, anything, 12, 3)
    blocks = sum(-(-int(b.response_valid[i].sum()) // 4) for b in fast.batches for i in range(3))
    assert fast.forwards == blocks  # every block decoded in one round
    assert fast.summary()["tokens_per_forward"] > static.summary()["tokens_per_forward"]
    with pytest.raises(ValueError, match="not a multiple of student's block size 4"):
        generate_greedy(student, prompts, anything, 10, 3)


def test_evaluate_model_record(models, tmp_path):
    from megatron_opdlm.data.tokenizer import load_tokenizer
    from megatron_opdlm.evaluation.evaluator import EvalSettings, evaluate_model
    from megatron_opdlm.evaluation.inputs import EvalItem
    from tests.unit.test_evaluation_support import write_char_tokenizer

    teacher, student, _ = models
    tokenizer = load_tokenizer(write_char_tokenizer(tmp_path / "tok"))
    qa = [
        EvalItem({"prompt": "x", "answer": "Paris", "category": "capital"}, [40, 41]),
        EvalItem({"prompt": "y", "answer": "5", "category": "half"}, [42, 43, 44]),
    ]
    heldout = [EvalItem({"prompt": "p"}, ids) for ids in random_prompts(3, seed=9)]
    settings = EvalSettings(max_new_tokens=8, qa_max_new_tokens=6, batch_size=2)
    record = evaluate_model(student, teacher, qa, heldout, tokenizer, settings)
    assert record["kind"] == "diffusion" and record["block_size"] == 4
    assert record["qa"]["total"] == 2 and record["qa"]["by_category"]["capital"][1] == 1
    assert len(record["qa"]["examples"]) == 2
    assert list(record["decoding"]) == ["static", "dynamic_0.95", "dynamic_0.9", "dynamic_0.8"]
    assert record["teacher_nll"] == record["decoding"]["static"]["teacher_nll"] > 0
    assert record["kl"] > 0 and record["kl_tokens"] > 0
    own = evaluate_model(teacher, teacher, qa, heldout, tokenizer, settings)
    assert list(own["decoding"]) == ["ar"] and abs(own["kl"]) < 1e-6
    assert own["teacher_nll"] < record["teacher_nll"]  # the teacher likes its own greedy answers
