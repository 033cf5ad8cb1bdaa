"""The rollout engine under TP=2 and PP=2 against TP=1 on the same weights (2 gloo ranks).

One spawn: both ranks first decode with TP=1 (DP=2, each its own copy), then rebuild the model for
each layout, load the TP=1 weights resharded, and decode again on fewer slots than prompts (so
slots are refilled mid-rollout on every stage). Greedy and seeded sampling must give identical
tokens, step maps and forward counts: the schedule depends only on the decisions, which the last
stage broadcasts, and each sequence draws from its own counter-based stream (logits differ from
TP=1 only by reduction order, ~2e-7 in fp32, far from flipping a decision here). The engine's
lean layer forward (diffusion.lean_layer, with its own TP all-reduce) runs on every layout.
"""

from __future__ import annotations

import dataclasses

import torch

from tests.dist_utils import run_distributed
from tests.distributed.layouts import each_layout

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24], [30, 31, 32]]
LAYOUTS = {"tp2": {"tp": 2}, "pp2": {"pp": 2}}
RUNS = {
    "greedy_shift": ({"token_shift": True}, {"remasking": "dynamic", "threshold": 0.7}, 2),
    "static_all_slots": ({}, {"remasking": "static"}, 0),
    "sampled": ({}, {"remasking": "dynamic", "temperature": 1.0, "top_k": 40, "top_p": 0.95}, 3),
}


def _decode_all(chunks, config):
    from megatron_opdlm.diffusion.engine import generate_rollout

    model = dataclasses.replace(config.model, eos_token_ids=[11, 26])  # rows end at their blocks
    results = {}
    for name, (diffusion, rollout, slots) in RUNS.items():
        batch = generate_rollout(
            chunks, PROMPTS, model, dataclasses.replace(config.diffusion, **diffusion),
            dataclasses.replace(config.rollout, **rollout), 12, slots=slots,
            generator=torch.Generator().manual_seed(11),
        )  # fmt: skip
        results[name] = {
            "tokens": batch.response_tokens,
            "step_map": batch.decoded_step_map,
            "valid": batch.response_valid,
            "num_forwards": batch.num_forwards,
        }
    return results


def _each_layout(world_size, layouts):
    """layouts.each_layout on this file's 4-layer greedy tiny student (test_engine_pipeline too)."""
    yield from each_layout(world_size, layouts, "model.num_layers=4", "rollout.temperature=0")


def _body(rank, world_size):
    from megatron_opdlm.diffusion.lean_layer import lean_supported

    results = {}
    for layout, chunks, config in _each_layout(world_size, LAYOUTS):
        # the engine's lean layers (TP: their own all-reduce) run on every layout here
        assert all(lean_supported(layer) for layer in chunks[0].decoder.layers), layout
        results[layout] = _decode_all(chunks, config)
    return results


def test_engine_tp2_pp2_match_tp1():
    per_rank = run_distributed(_body, world_size=2)
    reference = per_rank[0]["tp1"]
    assert not torch.equal(reference["sampled"]["tokens"], reference["static_all_slots"]["tokens"])
    assert int(reference["greedy_shift"]["valid"].sum(dim=1).min()) < 12, "a row ended early"
    for rank, results in enumerate(per_rank):
        for layout in ["tp1", *LAYOUTS]:
            for run, expected in reference.items():
                for key, value in expected.items():
                    got = results[layout][run][key]
                    assert torch.equal(got, value), f"rank {rank} {layout} {run}: {key}"
