"""Token proposals for masked positions: greedy, temperature, top-k, top-p, and their confidence.

Sampling is by inverse CDF with one uniform number per position, drawn by the caller from the
rollout generator. The draw count per round is fixed ([b, B]) whatever the vocabulary sharding,
so a seeded rollout is the same at any tensor-parallel size, and every rank can draw the same
numbers to keep its generator in step even when only the last pipeline stage samples.

Confidence is the probability of the chosen token under the model's distribution (softmax of the
logits at temperature 1, invalid ids excluded), as in the reference sampler: the dynamic
threshold then means the same thing at any sampling temperature.
"""

from __future__ import annotations

import torch

from megatron_opdlm.config import RolloutConfig


def _filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]  # [n, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [n, V]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = mass_before >= top_p  # the top token always stays (mass_before = 0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """probs [n, V] (rows sum to ~1), uniform [n] in [0, 1) -> token ids [n]."""
    cdf = probs.cumsum(dim=-1)  # [n, V]
    target = (uniform * cdf[:, -1]).unsqueeze(-1)  # [n, 1]
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [n]
    tokens = tokens.clamp(max=probs.shape[-1] - 1)
    # rounding can land past the last token with mass: take that token instead
    last_with_mass = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)  # [n]
    zero_mass = probs.gather(-1, tokens[:, None]).squeeze(-1) <= 0
    return torch.where(zero_mass, last_with_mass, tokens)


def propose_tokens(
    logits: torch.Tensor,  # [n, V] float, invalid ids already -inf
    rollout_cfg: RolloutConfig,
    uniform: torch.Tensor | None,  # [n] in [0, 1); unused when greedy
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. Returns (tokens [n] long, confidence [n] float32)."""
    logits = logits.float()
    model_probs = logits.softmax(dim=-1)  # [n, V]
    if rollout_cfg.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        if uniform is None:
            raise ValueError("sampling with temperature > 0 needs uniform draws")
        scaled = _filter_top_p(
            _filter_top_k(logits / rollout_cfg.temperature, rollout_cfg.top_k), rollout_cfg.top_p
        )
        tokens = _inverse_cdf(scaled.softmax(dim=-1), uniform.to(logits.device).float())
    confidence = model_probs.gather(-1, tokens[:, None]).squeeze(-1)  # [n]
    return tokens, confidence
