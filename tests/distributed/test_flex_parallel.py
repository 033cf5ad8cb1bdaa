"""The FlexAttention core under TP=2 (heads split; with and without sequence parallelism) against
TP=1 with the flex core on the same weights (2 gloo ranks, one spawn): greedy sampler tokens,
no-grad logits of packed student rows, and CPU-training gradients (dense fallback)."""

from __future__ import annotations

import torch

from tests.dist_utils import run_distributed
from tests.distributed.layouts import each_layout

# prompt width 8 and 12 new tokens: rows of S = 8 + 2 * 12 = 32 divide over TP=2 (sequence parallel)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 3], [12, 13], [20, 21, 22, 23, 24]]

# TP=2 splits the attention heads and reduces the output projection over 2 ranks: fp32 logits
# differ from TP=1 only by reduction order (~1e-7)
ATOL = 1e-5


def _rows_and_grads(chunks, config):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opdlm.diffusion.packing import pack_batch
    from megatron_opdlm.diffusion.sampler import generate
    from megatron_opdlm.diffusion.states import select_states

    rollout = generate(chunks, PROMPTS, config.model, config.diffusion, config.rollout, 12)
    x_t = select_states(
        rollout, "per_block", config.diffusion.block_size, config.model.student_mask_token_id,
        4, torch.Generator().manual_seed(3),
    )  # fmt: skip
    packed = pack_batch(
        rollout, x_t, config.model, config.diffusion, exclude_eos=False, mask_format="columns"
    )
    model = chunks[0]
    with torch.no_grad():
        logits = model(packed.tokens, packed.position_ids, packed.attention_mask)
        logits = gather_from_tensor_model_parallel_region(logits)  # [b, S, V]
    model.train()
    model.zero_grad()
    # the embedding gradient of the first layer's input norm is TP-replicated: compare it
    out = model(packed.tokens, packed.position_ids, packed.attention_mask)
    gather_from_tensor_model_parallel_region(out).float().logsumexp(-1).mean().backward()
    model.eval()
    norm_grad = model.decoder.layers[0].input_layernorm.weight.grad.clone()
    if config.parallel.sequence_parallel:  # each rank holds its sequence shard's part
        from megatron.core import parallel_state

        torch.distributed.all_reduce(
            norm_grad, group=parallel_state.get_tensor_model_parallel_group()
        )
    return {"tokens": rollout.response_tokens, "logits": logits, "norm_grad": norm_grad}


def _body(rank, world_size):
    layouts = {"tp2": {"tp": 2}, "tp2_sp": {"tp": 2, "sequence_parallel": True}}
    overrides = (
        "rollout.temperature=0",
        "rollout.remasking=static",
        "precision.attention_backend=flex",
    )
    return {
        layout: _rows_and_grads(chunks, config)  # the sampler turns SP off
        for layout, chunks, config in each_layout(world_size, layouts, *overrides)
    }


def test_flex_core_tp2_matches_tp1():
    per_rank = run_distributed(_body, world_size=2)
    for results in per_rank:
        reference = results["tp1"]
        for layout in ("tp2", "tp2_sp"):
            got = results[layout]
            assert torch.equal(got["tokens"], reference["tokens"]), layout
            torch.testing.assert_close(got["logits"], reference["logits"], atol=ATOL, rtol=0)
            torch.testing.assert_close(got["norm_grad"], reference["norm_grad"], atol=ATOL, rtol=0)
