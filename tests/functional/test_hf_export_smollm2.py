"""The exported SmolLM2 student (block 4, token shift: the demo's settings, 0 training steps).

- AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).generate() gives the
  same greedy tokens as tools/generate.py on the Megatron checkpoint: batch 1 and a ragged
  batch of 4, static and dynamic remasking, with and without the KV cache; logits within 1e-4;
- loading the export without trust_remote_code raises;
- lm-eval (backend `opdlm`, local task over the bundled QA set, offline) scores exactly what
  tools/evaluate.py scores on the same items and decoding settings, from the Megatron
  checkpoint and from the HF export; a local multiple-choice task runs through loglikelihood.
The HF directory and the teacher checkpoint are cached under pytest's cache directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = [  # a ragged batch of 4, then one more decoded alone (batch 1)
    "What is the capital of France?",
    "Name three colours.",
    "Write a short sentence about the sea, please.",
    "What is 7 times 8?",
    "Say hello.",
]
NEW_TOKENS = 8  # two blocks: the second one's first round commits the first (fused commit)
TASKS = ROOT / "megatron_opdlm" / "evaluation" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def smollm2(request, tmp_path_factory):
    from megatron_opdlm.checkpoint_layout import (
        TOKENIZER_DIR,
        read_model_meta,
        write_model_meta,
    )
    from megatron_opdlm.config import DiffusionConfig
    from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_opdlm.conversion.megatron_to_hf import convert_megatron_to_hf
    from megatron_opdlm.conversion.smollm2 import materialize_smollm2_hf
    from megatron_opdlm.data.tokenizer import load_tokenizer

    cache = request.config.cache.mkdir("opdlm-smollm2")
    hf_dir = materialize_smollm2_hf(cache / "hf")
    teacher = cache / "megatron"
    if not (teacher / "opdlm_model.yaml").is_file():
        convert_hf_to_megatron(hf_dir, teacher)
    work = tmp_path_factory.mktemp("student")
    student = work / "student"  # the teacher's weights as a block-4 token-shift student
    student.mkdir()
    for name in ("model", TOKENIZER_DIR):
        (student / name).symlink_to(teacher / name)
    model_cfg, _ = read_model_meta(teacher)
    write_model_meta(student, model_cfg, DiffusionConfig(block_size=4, token_shift=True))
    export = work / "export"
    convert_megatron_to_hf(student, export)
    tokenizer = load_tokenizer(teacher / TOKENIZER_DIR)
    prompts = [tokenizer.encode_prompt(q, chat=True) for q in QUESTIONS]
    return {"teacher": teacher, "student": student, "export": export, "work": work,
            "model_cfg": model_cfg, "prompts": prompts}  # fmt: skip


@pytest.fixture(scope="module")
def hf_model(smollm2):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        smollm2["export"], trust_remote_code=True, dtype=torch.float32
    )
    return model.eval()


def _tools_generate(smollm2, remasking, cache, tmp_path) -> list[list[int]]:
    """tools/generate.py at --batch-size 4 over the 5 prompts: the rollout engine on 4 slots, the
    5th prompt prefilled into the first freed one (no cache: lock-step batches of 4, then 1)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import generate as generate_tool

    prompts, out = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    argv = ["--ckpt", str(smollm2["student"]), "--prompts", str(prompts), "--chat",
            "--remasking", remasking, "--threshold", "0.9", "--max-new-tokens", str(NEW_TOKENS),
            "--batch-size", "4", "--output", str(out)]  # fmt: skip
    if not cache:
        argv.append("--no-kv-cache")
    assert generate_tool.main(argv) == 0
    return [json.loads(line)["tokens"] for line in out.read_text().splitlines()]


def _hf_generate(model, smollm2, rows, **kwargs):
    prompts = [smollm2["prompts"][i] for i in rows]
    pad = smollm2["model_cfg"].pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                         return_dict_in_generate=True, **kwargs)  # fmt: skip
    lengths = (out.step_map >= 0).sum(dim=1)
    return [out.sequences[i, width : width + int(n)].tolist() for i, n in enumerate(lengths)], out


@pytest.mark.parametrize("remasking,cache", [("static", True), ("static", False),
                                             ("dynamic", True), ("dynamic", False)])  # fmt: skip
def test_generate_matches_tools_generate(smollm2, hf_model, tmp_path, remasking, cache):
    expected = _tools_generate(smollm2, remasking, cache, tmp_path)
    kwargs = dict(remasking=remasking, threshold=0.9, use_cache=cache)
    assert _hf_generate(hf_model, smollm2, [0, 1, 2, 3], **kwargs)[0] == expected[:4]
    assert _hf_generate(hf_model, smollm2, [4], **kwargs)[0] == expected[4:]
    assert all(len(row) > 0 for row in expected)


def test_logits_match_the_megatron_sampler(smollm2, hf_model):
    from megatron_opdlm.checkpoint_layout import load_model_checkpoint, read_model_meta
    from megatron_opdlm.config import JobConfig, ParallelConfig, PrecisionConfig, RolloutConfig
    from megatron_opdlm.diffusion.sampler import generate
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.runtime import distributed

    model_cfg, diffusion = read_model_meta(smollm2["student"])
    job = JobConfig(model=model_cfg, diffusion=diffusion,
                    precision=PrecisionConfig(transformer_impl="local"))  # fmt: skip
    distributed.initialize(ParallelConfig(), seed=0)
    try:
        chunks = build_student(job)
        load_model_checkpoint(chunks, smollm2["student"])
        rounds = []
        rollout = RolloutConfig(steps_per_block=4, remasking="static", temperature=0.0)
        batch = generate(chunks, smollm2["prompts"][:4], model_cfg, diffusion, rollout, NEW_TOKENS,
                         round_callback=lambda *a: rounds.append(a))  # fmt: skip
    finally:
        distributed.shutdown()
    rows, out = _hf_generate(hf_model, smollm2, [0, 1, 2, 3], output_logits=True)
    v, compared = model_cfg.vocab_size, 0
    for block, _, logits, _, masked, select in rounds:
        for row, pos in torch.nonzero(select & masked).tolist():
            column = block * 4 + pos
            if column < len(rows[row]):
                # fp32, 30 layers, logits of magnitude ~20: Megatron's fused QKV / gate-up and
                # HF's separate projections sum in different orders; measured max 3e-5
                torch.testing.assert_close(out.logits[column][row, :v], logits[row, pos, :v],
                                           rtol=0, atol=1e-4)  # fmt: skip
                compared += 1
    assert compared == int(batch.response_valid.sum()) > 0


def test_loading_without_trust_remote_code_raises(smollm2):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="trust_remote_code|opdlm_llama"):
        AutoModelForCausalLM.from_pretrained(smollm2["export"])


QA_ITEMS = 8
QA_TOKENS = 16  # answers are judged on their first sentence


@pytest.fixture(scope="module")
def evaluate_qa(smollm2):
    sys.path.insert(0, str(ROOT / "tools"))
    import evaluate as evaluate_tool

    out = smollm2["work"] / "eval.json"
    argv = ["--teacher", str(smollm2["teacher"]), "--model", f"student={smollm2['student']}",
            "--qa-items", str(QA_ITEMS), "--heldout-prompts", "0",
            "--qa-max-new-tokens", str(QA_TOKENS), "--batch-size", "8",
            "--examples", str(QA_ITEMS), "--out", str(out)]  # fmt: skip
    assert evaluate_tool.main(argv) == 0
    return json.loads(out.read_text())["models"][0]["qa"]


@pytest.mark.parametrize("source", ["student", "export"])
def test_lm_eval_qa_equals_tools_evaluate(smollm2, evaluate_qa, source):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional extra [eval]")
    from lm_eval.tasks import TaskManager

    from megatron_opdlm.evaluation.lm_eval_backend import OpdlmLM

    lm = OpdlmLM(pretrained=str(smollm2[source]), batch_size=8)
    try:
        result = lm_eval.simple_evaluate(
            model=lm, tasks=["opdlm_qa"], task_manager=TaskManager(include_path=str(TASKS)),
            limit=QA_ITEMS, apply_chat_template=True, log_samples=True,
            gen_kwargs=f"max_gen_toks={QA_TOKENS}",
        )  # fmt: skip
    finally:
        lm.engine.close()
    samples = sorted(result["samples"]["opdlm_qa"], key=lambda s: s["doc_id"])
    verdicts = [bool(s["exact_match"]) for s in samples]
    assert verdicts == [e["correct"] for e in evaluate_qa["examples"]]
    assert result["results"]["opdlm_qa"]["exact_match,none"] == evaluate_qa["accuracy"]
    assert lm.stats["requests"] == QA_ITEMS and lm.stats["forwards"] > 0


def test_lm_eval_multiple_choice_runs_through_loglikelihood(smollm2):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional extra [eval]")
    from lm_eval.tasks import TaskManager

    from megatron_opdlm.evaluation.lm_eval_backend import OpdlmLM

    lm = OpdlmLM(pretrained=str(smollm2["student"]), batch_size=8)
    try:
        result = lm_eval.simple_evaluate(
            model=lm, tasks=["opdlm_qa_mc"], task_manager=TaskManager(include_path=str(TASKS)),
            limit=2, log_samples=True,
        )  # fmt: skip
    finally:
        lm.engine.close()
    assert 0.0 <= result["results"]["opdlm_qa_mc"]["acc,none"] <= 1.0
    for sample in result["samples"]["opdlm_qa_mc"]:
        scores = [resp[0] for resp in sample["resps"]]  # one (loglikelihood, is_greedy) per choice
        assert len(scores) == 4
        assert all(ll < 0 and isinstance(greedy, bool) for ll, greedy in scores)
    assert lm.stats["requests"] == 0  # no generation: every request was a loglikelihood
