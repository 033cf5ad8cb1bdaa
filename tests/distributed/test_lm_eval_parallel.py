"""lm-eval backend under data parallelism (2 gloo ranks, TP = PP = 1) against one process.

A tiny random Llama student with a word-level tokenizer ("w3" ... "w199") and a QA file of such
words: the generation and multiple-choice tasks must give the same per-document results and
metrics when lm-eval shards the documents over two data-parallel ranks and gathers them back.
"""

from __future__ import annotations

import json

import pytest

from tests.dist_utils import run_distributed

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra [eval]")
pytestmark = pytest.mark.slow


def _make_student(root):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_opdlm.config import DiffusionConfig
    from megatron_opdlm.checkpoint_layout import read_model_meta, write_model_meta
    from megatron_opdlm.conversion.hf_to_megatron import convert_hf_to_megatron
    from megatron_opdlm.conversion.synthetic import save_tiny_hf

    hf = save_tiny_hf("llama", root / "hf")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, 200)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "pad_token": "<pad>"})
    )
    ckpt = root / "ckpt"
    convert_hf_to_megatron(hf, ckpt)
    cfg, _ = read_model_meta(ckpt)
    write_model_meta(ckpt, cfg, DiffusionConfig(block_size=4, token_shift=False))
    qa = root / "qa.jsonl"
    rows = [{"id": f"q{i}", "category": "c", "prompt": f"w{10 + i} w{40 + 3 * i} w{90 + i}",
             "answer": f"w{100 + i % 5}"} for i in range(10)]  # fmt: skip
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ckpt, qa


def _evaluate(rank, world_size, ckpt, qa, tasks_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_opdlm.evaluation.lm_eval_backend import OpdlmLM

    lm = OpdlmLM(pretrained=str(ckpt), batch_size=3, max_gen_toks=8)
    result = lm_eval.simple_evaluate(
        model=lm, tasks=["opdlm_qa", "opdlm_qa_mc"], limit=10, log_samples=True,
        task_manager=TaskManager(include_path=tasks_dir, metadata={"qa_path": str(qa)}),
        gen_kwargs="max_gen_toks=8",
    )  # fmt: skip
    if result is None:  # lm-eval returns results on rank 0 only
        return None
    samples = {
        task: sorted((s["doc_id"], s["resps"]) for s in result["samples"][task])
        for task in ("opdlm_qa", "opdlm_qa_mc")
    }
    metrics = {t: result["results"][t] for t in ("opdlm_qa", "opdlm_qa_mc")}
    return {"samples": samples, "metrics": metrics, "rank": lm.rank, "world": lm.world_size}


def test_data_parallel_equals_one_process(tmp_path):
    from pathlib import Path

    import megatron_opdlm

    tasks_dir = str(Path(megatron_opdlm.__file__).parent / "evaluation" / "lm_eval_tasks")
    ckpt, qa = _make_student(tmp_path)
    (single,) = run_distributed(_evaluate, 1, args=(ckpt, qa, tasks_dir))
    parallel = run_distributed(_evaluate, 2, args=(ckpt, qa, tasks_dir))
    assert single["world"] == 1 and parallel[0]["world"] == 2 and parallel[1] is None
    assert len(single["samples"]["opdlm_qa"]) == 10 and len(single["samples"]["opdlm_qa_mc"]) > 0
    sharded = parallel[0]["samples"]
    assert sharded["opdlm_qa"] == single["samples"]["opdlm_qa"]  # greedy text: identical
    mc, mc_single = sharded["opdlm_qa_mc"], single["samples"]["opdlm_qa_mc"]
    assert [doc for doc, _ in mc] == [doc for doc, _ in mc_single]
    for (_, resps), (_, expected) in zip(mc, mc_single, strict=True):
        for [(ll, greedy)], [(ll_ref, greedy_ref)] in zip(resps, expected, strict=True):
            # other batch neighbours: other padding widths, fp32 sums in other shapes (~1e-7)
            assert abs(ll - ll_ref) < 1e-4 and greedy == greedy_ref
    for task in ("opdlm_qa", "opdlm_qa_mc"):
        for key in ("exact_match,none", "acc,none"):
            if key in single["metrics"][task]:
                assert parallel[0]["metrics"][task][key] == single["metrics"][task][key]
