"""The sampler under TP=2 (with and without sequence parallelism), PP=2 and PP=2 x VPP=2 against
TP=1 on the same weights (2 gloo ranks).

One spawn runs every layout: both ranks first decode with TP=1 (DP=2, each rank its own copy),
then rebuild the model for each layout, load the TP=1 weights resharded, and decode again.
Greedy decoding must give identical tokens, step maps and forward counts; seeded sampling must
give the same tokens as TP=1 with the same seed (the sampler draws [b, B] uniforms per round,
whatever the sharding, and samples from logits gathered over TP; logits differ from TP=1 only by
reduction order, ~2e-7 in fp32, far from flipping a draw here) and repeat exactly.
"""

from __future__ import annotations

import dataclasses

import torch

from tests.dist_utils import run_distributed
from tests.distributed.layouts import each_layout

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23, 24]]
LAYOUTS = {
    "tp2": {"tp": 2},
    "tp2_sequence_parallel": {"tp": 2, "sequence_parallel": True},
    "pp2": {"pp": 2},
    "pp2_vpp2": {"pp": 2, "vpp": 2},
}
RUNS = {
    "static_cached": ({}, {"remasking": "static"}),
    "dynamic_shift_cached": ({"token_shift": True}, {"remasking": "dynamic", "threshold": 0.7}),
    "static_no_cache": ({}, {"remasking": "static", "use_kv_cache": False}),
    "ar_block1": ({"token_shift": True, "block_size": 1}, {"steps_per_block": 1}),
    "sampled": ({}, {"remasking": "dynamic", "temperature": 1.0, "top_k": 40, "top_p": 0.95}),
    "sampled_again": ({}, {"remasking": "dynamic", "temperature": 1.0, "top_k": 40, "top_p": 0.95}),
}


def _decode_all(chunks, config):
    from megatron_opdlm.diffusion.sampler import generate

    results = {}
    for name, (diffusion, rollout) in RUNS.items():
        diffusion_cfg = dataclasses.replace(config.diffusion, **diffusion)
        rollout_cfg = dataclasses.replace(config.rollout, **rollout)
        generator = torch.Generator().manual_seed(11)
        batch = generate(
            chunks, PROMPTS, config.model, diffusion_cfg, rollout_cfg, 12, generator=generator
        )
        results[name] = {
            "tokens": batch.response_tokens,
            "step_map": batch.step_map,
            "valid": batch.response_valid,
            "num_forwards": batch.num_forwards,
            "generator_next": torch.rand(2, generator=generator),
        }
    return results


def _body(rank, world_size):
    from megatron_opdlm.diffusion.sampler import generate

    results = {}
    overrides = ("model.num_layers=4", "rollout.temperature=0")
    for layout, chunks, config in each_layout(world_size, LAYOUTS, *overrides):
        results[layout] = _decode_all(chunks, config)
        if layout == "tp1":  # data parallel: each rank decodes its own share (rank 0 two, 1 one)
            static = dataclasses.replace(config.rollout, remasking="static")
            share = generate(chunks, PROMPTS[rank::2], config.model, config.diffusion, static, 12)
            results["dp_share"] = share.response_tokens
    return results


def test_tp2_pp2_vpp2_match_tp1():
    per_rank = run_distributed(_body, world_size=2)
    reference = per_rank[0]["tp1"]
    assert torch.equal(reference["sampled"]["tokens"], reference["sampled_again"]["tokens"])
    assert not torch.equal(reference["sampled"]["tokens"], reference["static_cached"]["tokens"])
    for rank, results in enumerate(per_rank):
        expected = reference["static_cached"]["tokens"][rank::2]
        assert torch.equal(results["dp_share"], expected[:, : results["dp_share"].shape[1]])
        for layout in ["tp1", *LAYOUTS]:
            for run, runs_expected in reference.items():
                got = results[layout][run]
                for key, value in runs_expected.items():
                    assert torch.equal(got[key], value), f"rank {rank} {layout} {run}: {key}"
