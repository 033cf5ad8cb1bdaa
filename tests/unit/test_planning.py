"""The planner in one process: TP1 reference against real tensors, the CLI's bad-input errors, the
fake parallel layout, and the 70B worked example (shared/notes/anchors-cluster-eval-export.md 2).

Multi-rank layouts (TP2, PP2, PP2 x VPP2, DP2 with/without the distributed optimizer) are checked
in tests/distributed/test_planning_dist.py.
"""

from __future__ import annotations

import json

import pytest

from tests import planning_measure as pm
from tests.tiny import tiny_config

ACTIVATION_RTOL = 0.10  # the bar for the activation model
HF_DIR = "examples/hf_configs"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tp1_state_activations_and_kv_cache(single_process, dtype):
    for recompute in ("none", "full"):
        job = tiny_config("model.num_layers=2", f"precision.dtype={dtype}",
                          f"precision.recompute={recompute}")  # fmt: skip
        measured = pm.measure_activations(job)
        predicted = pm.predict_activations(job, 1, 0, recompute)
        print(f"tp1 {dtype} {recompute}: measured {measured} predicted {predicted} "
              f"error {abs(predicted - measured) / measured:.2%}")  # fmt: skip
        assert abs(predicted - measured) / measured <= ACTIVATION_RTOL, (
            recompute,
            measured,
            predicted,
        )
    state, kv = pm.measure_state(job), pm.measure_kv_cache(job)
    print(f"tp1 {dtype}: state {state} KV cache {kv}")
    assert state == pm.predict_state(job, 1, 0, 0, 0)
    assert kv == pm.predict_kv_cache(job, 1, 0)


def test_fake_layout_restores_parallel_state(single_process):
    from megatron.core import parallel_state

    from megatron_opdlm.planning import params

    before = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_pipeline_model_parallel_world_size(),
              parallel_state.get_tensor_model_parallel_group())  # fmt: skip
    job = tiny_config("model.num_layers=4", "parallel.tp=2", "parallel.pp=2", "parallel.vpp=2")
    counts = params.rank_counts(job, "student")
    assert set(counts) == {(0, 0), (1, 0), (0, 1), (1, 1)}
    # the first stage holds the embedding, the last the output layer and final norm
    assert counts[(0, 0)].chunks[0].has_embedding and counts[(0, 1)].chunks[-1].has_output_layer
    assert all(c.layers == 2 for c in counts.values())
    after = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_group())  # fmt: skip
    assert before == after


def _run(*argv):
    from megatron_opdlm.planning.cli import run

    return run(list(argv))


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--hf-config", f"{HF_DIR}/qwen3-8b.json", "--gpu", "h100-90g"], "h100-90g"),
        (["--hf-config", f"{HF_DIR}/qwen3-8b.json", "--nodes", "1", "--tp", "3"], "TP 3"),
        (["--hf-config", f"{HF_DIR}/qwen3-8b.json", "--tp", "3"], "parallel.tp=3"),
        (["--hf-config", f"{HF_DIR}/qwen3-8b.json", "--nodes", "1", "--dp", "4"], "--dp=4"),
        (["--hf-config", "missing.json"], "missing.json"),
        (["--hf-config", f"{HF_DIR}/qwen3-8b.json", "--config", "x.yaml"], "exactly one"),
        (
            ["--hf-config", f"{HF_DIR}/qwen3-8b.json", "--nodes", "1", "--global-batch-size", "3"],
            "global batch 3",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, names):
    code, text = _run(*argv)
    assert code == 2
    assert "\n" not in text and "Traceback" not in text and names in text, text


def test_missing_hf_fields_are_named(tmp_path):
    hf = json.loads(open(f"{HF_DIR}/qwen3-8b.json").read())
    del hf["num_hidden_layers"], hf["intermediate_size"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    code, text = _run("--hf-config", str(path))
    assert code == 2 and "num_hidden_layers" in text and "intermediate_size" in text, text


def test_llama3_70b_tp8_pp2_dp4_does_not_fit_and_kv_cache_counted(tmp_path):
    """The anchors' worked example: 64 x H100-80G, TP8 x PP2 x DP4, paper settings."""
    out = tmp_path / "plan.json"
    code, text = _run("--hf-config", f"{HF_DIR}/llama-3-70b.json", "--nodes", "8",
                      "--tp", "8", "--pp", "2", "--attention", "flex", "--recompute", "full",
                      "--json", str(out))  # fmt: skip
    assert code == 1 and "does NOT fit" in text, text
    plan = json.loads(out.read_text())["candidates"][0]
    assert plan["student_params"] == plan["teacher_params"] == 70_565_036_032 + 0 * 1
    rollout = plan["ranks"][0]["phases"]["rollout"]
    # K and V: 2 x (2000 + 4000) x 32 rows x 1 kv head/TP rank x 128 x 2 B x 40 layers
    assert rollout["kv_cache"] == 2 * 6000 * 32 * 1 * 128 * 2 * 40


def test_search_keeps_valid_layouts_fitting_first_fastest_first():
    from megatron_opdlm.planning import memory, search
    from megatron_opdlm.planning.gpus import GPU

    job = tiny_config("model.num_layers=4", "precision.dtype=bf16", "train.global_batch_size=4",
                      "train.prompts_per_rollout=8")  # fmt: skip
    probe = memory.PlanRequest(job=job, dp=4, prompt_length=8, response_length=16,
                               gpu=GPU("probe", 2**40, 1e3, 0, 1e3, 1e2, 1e1),
                               allowance=memory.Allowance(0, 0.0))  # fmt: skip
    cands = search.search(probe)
    # 2 kv heads: TP 4 does not divide them; 4 layers: PP x VPP must divide 4
    assert {(c.tp, c.pp, c.vpp) for c in cands} == {
        (1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 4, None), (1, 2, 2),
        (2, 2, 2),
    }  # fmt: skip
    needs = sorted(c.plan.required_bytes() for c in cands)
    limit = needs[len(needs) // 2]  # a GPU on which about half the layouts fit
    probe.gpu = GPU("half", limit, 1e3, 0, 1e3, 1e2, 1e1)
    cands = search.search(probe)
    fits = [c.fits for c in cands]
    assert any(fits) and not all(fits) and fits == sorted(fits, reverse=True)
    times = [c.time.total for c in cands if c.fits]
    assert times == sorted(times)


def test_rollout_slots_bound_the_kv_cache_rows():
    """Continuous batching (rollout.slots) caches the slots, not every prompt of the DP rank."""
    from megatron_opdlm.planning import memory

    job = tiny_config("train.prompts_per_rollout=8", "train.global_batch_size=8")
    all_rows = pm.request(job, dp=2)
    assert all_rows.rollout_rows == 4  # 8 prompts over 2 DP ranks
    job.rollout.slots = 3
    slotted = pm.request(job, dp=2)
    assert slotted.rollout_rows == 3
    assert memory.kv_cache_bytes(slotted, 2) * 4 == memory.kv_cache_bytes(all_rows, 2) * 3
    job.rollout.slots = 16  # more slots than prompts: the prompts bound it
    assert pm.request(job, dp=2).rollout_rows == 4


def test_teacher_targets_are_planned_per_micro_batch_not_per_step():
    """training/steps.py makes and reads the teacher's targets per micro-batch inside the
    student's schedule: the planned term is one micro-batch's [mbs, R, V] fp32 on the last stage,
    whatever the number of micro-batches per optimizer step."""
    from megatron_opdlm.planning import memory
    from megatron_opdlm.planning.gpus import GPU

    held = {}
    for batch in (4, 16):
        job = tiny_config("train.prompts_per_rollout=16", f"train.global_batch_size={batch}",
                          "train.micro_batch_size=2")  # fmt: skip
        req = memory.PlanRequest(job=job, dp=1, prompt_length=8, response_length=16,
                                 gpu=GPU("probe", 2**40, 1e3, 0, 1e3, 1e2, 1e1))  # fmt: skip
        assert req.micro_batches == batch // 2
        held[batch] = memory.plan_memory(req).ranks[-1].phases["distill"]["teacher_targets"]
    assert held[4] == held[16] == 2 * 16 * job.model.padded_vocab_size * 4
