"""Block-wise log-likelihood (evaluation.block_scoring) against brute-force sequential scoring.

The brute force runs one sampler-style forward per continuation token: [context | earlier
blocks of y (clean) | the current block with y_<j and masks at >= j], block-causal, reading
position j (or j - 1 with token shift), exactly what the sampler would see decoding y left to
right one token per round. On a tiny random model in fp64 the two agree far within 1e-5.
is_greedy is checked against the real greedy static sampler: its own output is greedy, a
changed token is not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_opdlm.config import ParallelConfig
from megatron_opdlm.evaluation.block_scoring import ScoringModel, score_continuations
from megatron_opdlm.models.masks import block_causal_mask
from tests.tiny import tiny_config

PAIRS = [
    ([5, 17, 42, 9, 33], [8, 21, 3, 77, 14, 6, 90]),  # 7 tokens: one full block + 3
    ([7, 3], [11]),
    ([60, 61, 62, 63, 64, 65, 66, 67, 68], [4, 5, 6, 7, 8, 9, 10, 11]),  # two whole blocks
]


@pytest.fixture(scope="module", params=[False, True], ids=["no_shift", "token_shift"])
def tiny(request):
    from megatron_opdlm.diffusion.model_runner import ModelRunner
    from megatron_opdlm.models.builder import build_student
    from megatron_opdlm.runtime import distributed

    job = tiny_config("diffusion.block_size=4", f"diffusion.token_shift={request.param}",
                      "model.init_method_std=0.2")  # fmt: skip
    distributed.initialize(ParallelConfig(), seed=7)
    chunks = build_student(job)
    for chunk in chunks:
        chunk.double().eval()  # fp64: the two computations then agree to ~1e-12
    runner = ModelRunner(chunks)

    def forward(tokens, positions, mask, rows):
        return runner.forward(tokens, positions, mask, rows).double()

    m = job.model
    model = ScoringModel(4, request.param, m.student_mask_token_id, m.vocab_size, m.pad_token_id, 4)
    yield job, chunks, forward, model
    distributed.shutdown()


def _sequential(forward, model: ScoringModel, context, y):
    total, bs = 0.0, model.block_size
    for i, token in enumerate(y):
        block, j = divmod(i, bs)
        current = y[block * bs : block * bs + j] + [model.mask_token_id] * (bs - j)
        seq = torch.tensor([context + y[: block * bs] + current])
        length = seq.shape[1]
        column = len(context) + block * bs + j - (1 if model.token_shift else 0)
        mask = block_causal_mask(length, len(context), bs, batch=1)
        logits = forward(seq, torch.arange(length)[None], mask, torch.tensor([column]))[0, 0]
        ids = torch.arange(logits.shape[-1])
        logits = logits.masked_fill((ids >= model.vocab_size) | (ids == model.mask_token_id),
                                    float("-inf"))  # fmt: skip
        total += float(logits.log_softmax(-1)[token])
    return total


def test_blockwise_equals_sequential(tiny):
    _, _, forward, model = tiny
    forwards = []

    def counting(*args):
        forwards.append(1)
        return forward(*args)

    got = score_continuations(counting, model, [c for c, _ in PAIRS], [y for _, y in PAIRS],
                              with_greedy=False)  # fmt: skip
    assert len(forwards) == model.block_size  # B forwards, whatever the lengths
    for (context, y), (ll, _) in zip(PAIRS, got, strict=True):
        expected = _sequential(forward, model, context, y)
        # fp64 on both sides: the only difference is summation order inside the matmuls
        assert abs(ll - expected) < 1e-5, (ll, expected)
        assert ll < 0


def test_is_greedy_follows_the_greedy_sampler(tiny):
    from megatron_opdlm.diffusion.sampler import generate

    job, chunks, forward, model = tiny
    contexts = [c for c, _ in PAIRS]
    rollout = dataclasses.replace(job.rollout, temperature=0.0, remasking="static",
                                  steps_per_block=4)  # fmt: skip
    batch = generate(chunks, contexts, job.model, job.diffusion, rollout, 8)
    greedy = [batch.response_tokens[i, : int(batch.response_valid[i].sum())].tolist()
              for i in range(len(contexts))]  # fmt: skip
    greedy = [g[:6] if len(g) > 6 else g for g in greedy]  # a prefix ending inside a block
    results = score_continuations(forward, model, contexts, greedy)
    assert all(is_greedy for _, is_greedy in results)
    changed = [[(g[0] + 1) % model.vocab_size or 2, *g[1:]] for g in greedy]
    changed = [[t if t != model.mask_token_id else 3 for t in g] for g in changed]
    assert not any(is_greedy for _, is_greedy in score_continuations(forward, model, contexts,
                                                                       changed))  # fmt: skip
