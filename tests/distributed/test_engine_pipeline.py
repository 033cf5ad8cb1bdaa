"""Pipelined rollout rounds (PP=2, micro-batches of slots) against the one-process engine.

One spawn (2 gloo ranks) serves every test here: both ranks first decode with TP=1 (DP=2, each
rank its own copy: the reference, one slot per prompt), then at PP=2 on fewer slots than prompts
(slots refilled mid-rollout) with 2 and 3 micro-batches, greedy and seeded; auto's two outcomes;
a mid-rollout abort followed by another rollout on the same process group; a `should_abort`
that is itself a collective (as the trainer's); and PP=2 x VPP=2, which falls back to
whole-batch rounds. Tokens, step maps and forward counts must be identical
(each sequence draws from its own counter-based stream, and its decisions depend only on its own
logits); the last stage's logits must match the reference's at atol 1e-5 (fp32: a micro-batch's
forward attends over its own key width, which changes the summation order; measured <= 2e-6 in
tests/unit/test_engine.py).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.distributed.test_engine_parallel import PROMPTS, _each_layout

PIPELINE_PROMPTS = [*PROMPTS, [40] * 9, [12, 13]]  # 6 prompts, a repeated one
NEW_TOKENS = 12
SAMPLED = {"remasking": "dynamic", "temperature": 1.0, "top_k": 40, "top_p": 0.95}
# name: (diffusion, rollout, slots (< 6 prompts), micro-batches)
RUNS = {
    "greedy_m2": ({"token_shift": True}, {"remasking": "dynamic", "threshold": 0.7}, 4, 2),
    "greedy_m3": ({}, {"remasking": "static"}, 3, 3),
    "sampled_m2": ({}, SAMPLED, 5, 2),
    "sampled_m3": ({"token_shift": True}, SAMPLED, 4, 3),
}
LAYOUTS = {"pp2": {"pp": 2}, "pp2_vpp2": {"pp": 2, "vpp": 2}}


def _rollout(chunks, config, run, slots, microbatches, **hooks):
    from megatron_opdlm.diffusion.engine import generate_rollout

    diffusion, rollout = RUNS[run][:2]
    logits, widths, stats = {}, [], {}

    def record(sequences, blocks, rounds, round_logits, x, masked, select):
        widths.append(sequences.numel())
        for i, sequence in enumerate(sequences.tolist()):
            key = (sequence, int(blocks[i]), int(rounds[i]))
            logits[key] = round_logits[i][masked[i]].clone()

    batch = generate_rollout(
        chunks, PIPELINE_PROMPTS, dataclasses.replace(config.model, eos_token_ids=[11, 26]),
        dataclasses.replace(config.diffusion, **diffusion),
        dataclasses.replace(config.rollout, **rollout, pipeline_microbatches=microbatches),
        NEW_TOKENS, slots=slots, generator=torch.Generator().manual_seed(11),
        round_callback=record, stats=stats, **hooks,
    )  # fmt: skip
    return {
        "tokens": batch.response_tokens,
        "step_map": batch.decoded_step_map,
        "valid": batch.response_valid,
        "num_forwards": batch.num_forwards,
        "logits": logits,
        "widest_round": max(widths, default=0),
        "stats": stats,
    }


def _aborted(chunks, config):
    """(message, blocks asked) of a pipelined rollout that `should_abort` stops at block 2."""
    from megatron_opdlm.diffusion.engine import RolloutAborted

    asked = []

    def abort_at_block_two(block):
        asked.append(block)
        return block == 2

    try:
        _rollout(chunks, config, "sampled_m2", 4, 2, should_abort=abort_at_block_two)
    except RolloutAborted as error:
        return str(error), asked
    return "not aborted", asked


def _agreed_never(block):
    from megatron.core import parallel_state

    from megatron_opdlm.runtime import collectives

    return collectives.any_rank(False, group=parallel_state.get_model_parallel_group())


def _body(rank, world_size):
    from megatron_opdlm.diffusion import engine_pipeline

    results = {}
    for layout, chunks, config in _each_layout(world_size, LAYOUTS):
        if layout == "tp1":
            results["reference"] = {run: _rollout(chunks, config, run, 0, 1) for run in RUNS}
        elif layout == "pp2_vpp2":
            results["vpp"] = _rollout(chunks, config, "greedy_m2", 4, 2)
        else:
            out = {run: _rollout(chunks, config, run, *RUNS[run][2:]) for run in RUNS}
            # auto (0): the ideal measured on the first rounds against the threshold
            for name, threshold in (("auto_pipelines", 0.0), ("auto_falls_back", math.inf)):
                engine_pipeline._decided.clear()  # measure afresh: the same shape each time
                engine_pipeline.MIN_IDEAL_GAIN = threshold
                out[name] = _rollout(chunks, config, "greedy_m3", 4, 0)
            # the next rollout of that shape reuses the choice (no calibration rounds), even
            # with a threshold that would now choose otherwise
            engine_pipeline.MIN_IDEAL_GAIN = 0.0
            out["auto_reused"] = _rollout(chunks, config, "greedy_m3", 4, 0)
            out["abort"] = _aborted(chunks, config)
            # nothing of the aborted rollout is left in flight: the next one decodes the same
            out["after_abort"] = _rollout(chunks, config, "sampled_m2", 4, 2)
            # a check that agrees over the group (a collective, as the trainer's) while the
            # pipeline has messages in flight
            out["agreed_check"] = _rollout(
                chunks, config, "sampled_m2", 4, 2, should_abort=_agreed_never
            )
            results["pp2"] = out
    return results


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(_body, world_size=2)


def _assert_same(got, expected, rank, name, last_stage):
    for key in ("tokens", "step_map", "valid", "num_forwards"):
        assert torch.equal(got[key], expected[key]), f"rank {rank} {name}: {key}"
    if last_stage:  # round_callback runs on the last stage only
        assert got["logits"].keys() == expected["logits"].keys(), f"{name}: rounds"
        for key, value in expected["logits"].items():
            torch.testing.assert_close(got["logits"][key], value, rtol=0, atol=1e-5)


@pytest.mark.timeout(900)
def test_pipelined_rounds_match_the_one_process_engine(per_rank):
    reference = per_rank[0]["reference"]
    assert not torch.equal(reference["sampled_m2"]["tokens"], reference["greedy_m2"]["tokens"])
    lengths = reference["greedy_m2"]["valid"].sum(dim=1)
    assert int(lengths.min()) < NEW_TOKENS, "a row ended early (EOS mid-rollout)"
    for rank, results in enumerate(per_rank):
        for run, (_, _, slots, microbatches) in RUNS.items():
            got = results["pp2"][run]
            _assert_same(got, reference[run], rank, run, last_stage=rank == 1)
            stats = got["stats"]
            assert stats["pipeline_microbatches"] == microbatches, stats["pipeline_reason"]
            assert stats["round_wall_s"]["pipelined"] and not stats["round_wall_s"]["whole-batch"]
            assert stats["prefills"] > microbatches, "freed slots were refilled"
            if rank == 1:  # each round served one micro-batch's slots, never the whole set
                assert got["widest_round"] <= -(-slots // microbatches), run


@pytest.mark.timeout(900)
def test_auto_pipelines_or_falls_back_on_the_measured_ideal(per_rank):
    reference = per_rank[0]["reference"]["greedy_m3"]
    for rank, results in enumerate(per_rank):
        for name, microbatches in (("auto_pipelines", 2), ("auto_falls_back", 1)):
            got = results["pp2"][name]
            _assert_same(got, reference, rank, name, last_stage=rank == 1)
            stats = got["stats"]
            assert stats["pipeline_microbatches"] == microbatches, stats["pipeline_reason"]
            # both modes were measured on the first rounds; the ranks agreed on one number
            assert all(stats["round_busy_s"][mode] for mode in ("whole-batch", "pipelined"))
            assert 0 < stats["pipeline_ideal_gain"] < math.inf
            assert (
                stats["pipeline_ideal_gain"]
                == per_rank[0]["pp2"][name]["stats"]["pipeline_ideal_gain"]
            )
        assert results["pp2"]["auto_falls_back"]["stats"]["pipeline_reason"].startswith(
            "auto: whole-batch rounds"
        )
        reused = results["pp2"]["auto_reused"]
        _assert_same(reused, reference, rank, "auto_reused", last_stage=rank == 1)
        assert reused["stats"]["pipeline_microbatches"] == 1
        assert "decided earlier" in reused["stats"]["pipeline_reason"]
        assert not reused["stats"]["round_busy_s"]["pipelined"], "no calibration rounds"


@pytest.mark.timeout(900)
def test_pipelined_abort_raises_on_every_rank_and_leaves_nothing_in_flight(per_rank):
    # and a should_abort that is itself a collective runs through a pipelined rollout
    reference = per_rank[0]["reference"]["sampled_m2"]
    for rank, results in enumerate(per_rank):
        message, asked = results["pp2"]["abort"]
        assert message == "rollout aborted before block 2", f"rank {rank}"
        assert asked == [0, 1, 2], f"rank {rank}: asked once per new block"
        _assert_same(results["pp2"]["after_abort"], reference, rank, "after", rank == 1)
        _assert_same(results["pp2"]["agreed_check"], reference, rank, "agreed", rank == 1)


@pytest.mark.timeout(900)
def test_vpp_falls_back_to_whole_batch_rounds(per_rank):
    reference = per_rank[0]["reference"]["greedy_m2"]
    for rank, results in enumerate(per_rank):
        got = results["vpp"]
        _assert_same(got, reference, rank, "vpp", last_stage=rank == 1)
        assert got["stats"]["pipeline_microbatches"] == 1
        assert "VPP" in got["stats"]["pipeline_reason"]
