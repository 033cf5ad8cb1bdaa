"""lm-eval backend under data, tensor and pipeline parallelism (2 gloo ranks) against one process.

A tiny random Llama student (4 layers, 4 heads, 2 KV groups) with a word-level tokenizer ("w3" ...
"w199") and a QA file of such words: the generation and multiple-choice tasks must give the same
per-document results and metrics when lm-eval shards the documents over two data-parallel ranks
(TP = PP = 1) and when the two ranks hold one model as TP = 2 or PP = 2 (both decode every
document; lm-eval returns the results on LOCAL_RANK 0). One spawn of 2 processes runs the three
layouts in turn (the process group is kept, Megatron's parallel state rebuilt); one spawn of 1
process is the reference.
"""

from __future__ import annotations

import json

import pytest

from tests.dist_utils import run_distributed

pytest.importorskip("lm_eval", reason="lm-eval is the optional extra [eval]")
pytestmark = pytest.mark.slow
TASKS = ("opdlm_qa", "opdlm_qa_mc")
# (name, tp, pp) run one after another in the same 2 processes
LAYOUTS = (("dp2", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2))


def _make_student(root):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron_opdlm.checkpoint_layout import read_model_meta, write_model_meta
    from megatron_opdlm.config import DiffusionConfig
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


def _evaluate(rank, world_size, ckpt, qa, tasks_dir, layouts):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from megatron.core import parallel_state

    from megatron_opdlm.evaluation.lm_eval_backend import OpdlmLM

    out = {}
    for name, tp, pp in layouts:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()  # keep the process group for the next layout
        lm = OpdlmLM(pretrained=str(ckpt), batch_size=3, max_gen_toks=8, tp=tp, pp=pp)
        result = lm_eval.simple_evaluate(
            model=lm, tasks=list(TASKS), limit=10, log_samples=True,
            task_manager=TaskManager(include_path=tasks_dir, metadata={"qa_path": str(qa)}),
            gen_kwargs="max_gen_toks=8",
        )  # fmt: skip
        info = {"rank": lm.rank, "world": lm.world_size, "result": None,
                "layout": (parallel_state.get_tensor_model_parallel_world_size(),
                           parallel_state.get_pipeline_model_parallel_world_size())}  # fmt: skip
        if result is not None:  # lm-eval returns results on (LOCAL_)rank 0 only
            info["result"] = {
                "samples": {
                    task: sorted((s["doc_id"], s["resps"]) for s in result["samples"][task])
                    for task in TASKS
                },
                "metrics": {task: result["results"][task] for task in TASKS},
            }
        out[name] = info
    if world_size > 1:  # asked for TP=2 while PP=2 (the last layout) runs: refused, not ignored
        try:
            OpdlmLM(pretrained=str(ckpt), tp=2, pp=1)
        except ValueError as exc:
            out["mismatch"] = str(exc)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the one-process reference, {layout: rank results} of the 2-process runs)."""
    from pathlib import Path

    import megatron_opdlm

    tmp = tmp_path_factory.mktemp("lm_eval_parallel")
    tasks_dir = str(Path(megatron_opdlm.__file__).parent / "evaluation" / "lm_eval_tasks")
    ckpt, qa = _make_student(tmp)
    (single,) = run_distributed(_evaluate, 1, args=(ckpt, qa, tasks_dir, [("one", 1, 1)]))
    parallel = run_distributed(_evaluate, 2, args=(ckpt, qa, tasks_dir, LAYOUTS))
    by_layout = {name: [rank[name] for rank in parallel] for name, _, _ in LAYOUTS}
    for name, tp, pp in LAYOUTS:
        assert [rank["layout"] for rank in by_layout[name]] == [(tp, pp)] * 2, name
    assert [rank.get("mismatch") for rank in parallel] == [
        "model_args tp=2 pp=1, but this process already runs Megatron with tp=1 pp=2; "
        "pass tp=1,pp=2"
    ] * 2
    return single["one"], by_layout


def _assert_same_results(result, reference, ll_tol: float):
    samples, expected = result["samples"], reference["samples"]
    assert len(expected["opdlm_qa"]) == 10 and len(expected["opdlm_qa_mc"]) > 0
    # greedy text identical: a flip needs two top logits closer than the layouts' ~1e-6 drift
    assert samples["opdlm_qa"] == expected["opdlm_qa"]
    mc, mc_ref = samples["opdlm_qa_mc"], expected["opdlm_qa_mc"]
    assert [doc for doc, _ in mc] == [doc for doc, _ in mc_ref]
    for (_, resps), (_, ref) in zip(mc, mc_ref, strict=True):
        for [(ll, greedy)], [(ll_ref, greedy_ref)] in zip(resps, ref, strict=True):
            assert abs(ll - ll_ref) < ll_tol and greedy == greedy_ref
    for task in TASKS:
        for key in ("exact_match,none", "acc,none"):
            if key in reference["metrics"][task]:
                assert result["metrics"][task][key] == reference["metrics"][task][key]


def test_data_parallel_equals_one_process(runs):
    single, layouts = runs
    rank0, rank1 = layouts["dp2"]
    assert single["world"] == 1 and rank0["world"] == 2 and (rank0["rank"], rank1["rank"]) == (0, 1)
    assert rank1["result"] is None  # gathered on data-parallel rank 0
    # other batch neighbours: other padding widths, fp32 sums in other shapes (~1e-7)
    _assert_same_results(rank0["result"], single["result"], ll_tol=1e-4)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_model_parallel_equals_one_process(runs, layout):
    single, layouts = runs
    rank0, rank1 = layouts[layout]
    # one model over both ranks: one data-parallel replica, every document decoded on both
    assert (rank0["world"], rank1["world"]) == (1, 1) and (rank0["rank"], rank1["rank"]) == (0, 0)
    assert rank1["result"] is None  # lm-eval reports on LOCAL_RANK 0 only
    # TP: row-parallel linears all-reduce partial sums (another fp32 summation order) and the
    # vocabulary is gathered from shards, ~1e-6 on logits; PP runs the same kernels stage by
    # stage. A log-likelihood sums a few such log-probs: 1e-4 leaves a wide margin.
    _assert_same_results(rank0["result"], single["result"], ll_tol=1e-4)
