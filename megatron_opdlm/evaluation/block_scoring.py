"""Deterministic block-wise log-likelihood of a continuation under a block-diffusion student.

What it measures. The student decodes a continuation y block by block; within a block it
unmasks tokens over rounds. Fix the order "left to right, one token per round": then

    log p(y | c) = sum_b sum_j log p(y_{b,j} | c, y_{blocks < b}, y_{b, < j}, masks at >= j)

(a chain rule; each factor is the student's distribution at a masked position with exactly
the context the sampler would give it in that order). It is not an ELBO over random masks and
not the AR likelihood: it is the probability of y under that one decoding order.

How it is computed in B forwards for any length. In a packed row [c | x0 = y | x_t] every x_t
block sees only the clean x0 blocks before it (and itself), so the blocks are independent given
y: pass j masks in-block positions >= j of *every* x_t block at once and reads position j of
each block. With token shift position j is read from the query at j - 1 (for j = 0 from the last
clean token before the block, the same in every pass).

is_greedy: whether the evaluation's greedy sampler (static remasking, `steps_per_block` rounds,
the most confident masked positions first) would produce y. That is simulated exactly in
`steps_per_block` more forwards: every block follows the sampler's own choices given the clean
earlier blocks of y (what the sampler would have committed had it matched so far); y is greedy
iff every token the sampler commits at a position < len(y) equals y there.

`forward(tokens [b, S], positions [b, S], mask [b, 1, S, S] bool True = masked out, rows [n])`
returns full-vocabulary logits [b, n, V] (float32) on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_opdlm.config import RolloutConfig
from megatron_opdlm.diffusion.remasking import static_remasking
from megatron_opdlm.models.masks import packed_row_mask, xt_logit_columns

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ScoringModel:
    """What scoring needs to know about the model."""

    block_size: int
    token_shift: bool
    mask_token_id: int
    vocab_size: int  # ids >= vocab_size (padding rows) and the mask id are not tokens
    pad_token_id: int
    steps_per_block: int  # the greedy sampler's rounds per block (is_greedy)


def _log_probs(logits: torch.Tensor, model: ScoringModel) -> torch.Tensor:
    """[..., V] -> log-softmax over the real tokens (invalid ids -inf), float64."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    invalid = (ids >= model.vocab_size) | (ids == model.mask_token_id)
    return logits.double().masked_fill(invalid, float("-inf")).log_softmax(dim=-1)


@torch.no_grad()
def score_continuations(
    forward: Forward,
    model: ScoringModel,
    contexts: list[list[int]],
    continuations: list[list[int]],
    with_greedy: bool = True,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) per pair, as defined in the module docstring."""
    if len(contexts) != len(continuations) or not contexts:
        raise ValueError("score_continuations needs as many (non-empty) contexts as continuations")
    for i, (c, y) in enumerate(zip(contexts, continuations, strict=True)):
        if not c or not y:
            raise ValueError(f"pair {i}: context and continuation must each have >= 1 token")
    bs, device = model.block_size, torch.device("cpu")
    b = len(contexts)
    p = max(len(c) for c in contexts)
    lengths = torch.tensor([len(y) for y in continuations])  # [b]
    r = int(-(-int(lengths.max()) // bs) * bs)
    context = torch.full((b, p), model.pad_token_id, dtype=torch.long)
    context_valid = torch.zeros(b, p, dtype=torch.bool)
    x0 = torch.full((b, r), model.pad_token_id, dtype=torch.long)
    for i, (c, y) in enumerate(zip(contexts, continuations, strict=True)):
        context[i, p - len(c) :], context_valid[i, p - len(c) :] = torch.tensor(c), True
        x0[i, : len(y)] = torch.tensor(y)
    columns = torch.arange(r)
    inside = columns[None, :] < lengths[:, None]  # [b, R] real continuation tokens
    blocks_used = -(-lengths // bs) * bs
    xt_valid = columns[None, :] < blocks_used[:, None]  # whole blocks the sampler would decode
    valid = torch.cat([context_valid, inside, xt_valid], dim=1)  # [b, P + 2R]
    mask, positions = packed_row_mask(p, r, bs, valid)
    read = xt_logit_columns(p, r, bs, model.token_shift)  # [R] column predicting token r
    in_block = columns % bs  # [R]
    targets = x0.clone()

    def run(xt: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([context, x0, xt], dim=1)  # [b, P + 2R]
        return forward(tokens.to(device), positions, mask, rows)

    # left-to-right chain rule: pass j masks in-block positions >= j of every block
    log_prob = torch.zeros(b, r, dtype=torch.float64)
    l2r_greedy = torch.ones(b, dtype=torch.bool)
    for j in range(bs):
        picked = columns[in_block == j]  # [n] response indices read in this pass
        xt = torch.where(in_block[None, :] < j, x0, model.mask_token_id)
        logits = run(xt, read[picked])  # [b, n, V]
        lp = _log_probs(logits.cpu(), model)
        log_prob[:, picked] = lp.gather(-1, targets[:, picked, None]).squeeze(-1)
        l2r_greedy &= ((lp.argmax(-1) == targets[:, picked]) | ~inside[:, picked]).all(dim=1)
    total = torch.where(inside, log_prob, 0.0).sum(dim=1)  # [b]
    greedy = _greedy_static(run, model, x0, inside, read, r) if with_greedy else l2r_greedy
    return [(float(total[i]), bool(greedy[i])) for i in range(b)]


def _greedy_static(run, model: ScoringModel, x0, inside, read, r) -> torch.Tensor:
    """[b] bool: the greedy static sampler would commit y (module docstring)."""
    b, bs = x0.shape[0], model.block_size
    rollout = RolloutConfig(steps_per_block=model.steps_per_block, remasking="static",
                            temperature=0.0)  # fmt: skip
    xt = torch.full_like(x0, model.mask_token_id)  # [b, R]
    masked = torch.ones(b, r, dtype=torch.bool)
    matches = torch.ones(b, dtype=torch.bool)
    for round_index in range(model.steps_per_block):
        lp = _log_probs(run(xt, read).cpu(), model)  # [b, R, V]
        confidence, proposal = lp.exp().max(dim=-1)  # greedy token and its probability
        select = static_remasking(
            confidence.float().view(b * r // bs, bs),
            masked.view(b * r // bs, bs),
            round_index,
            model.steps_per_block,
            rollout,
        ).view(b, r)
        wrong = select & inside & (proposal != x0)
        matches &= ~wrong.any(dim=1)
        xt = torch.where(select, proposal, xt)
        masked &= ~select
    return matches
