"""Block-diffusion decoding for the exported OPDLM student (remote code: torch + transformers only).

The same algorithm as megatron_opdlm.diffusion.sampler, on a transformers model:
- prompts left-padded to one width P; response block k spans columns [P + kB, P + (k+1)B); the
  prompt is block-causal with blocks aligned to P; position ids are column indices;
- each block starts as B mask tokens; for up to `steps_per_block` rounds the model scores the
  block given the committed context, proposes a token per masked position (greedy, or
  temperature / top-k / top-p by inverse CDF with one uniform draw per position, [b, B] per
  round from `generator`), confidence = the model's probability of that token, and a remasking
  strategy picks what to unmask (static: the k most confident; dynamic: above the threshold, at
  least one); a row stops after the block holding its first EOS (or a stop condition);
- token shift: position j is predicted from the query at j - 1 (j = 0: the last committed token);
- KV cache (a transformers DynamicCache) of committed columns: rounds write the block's K/V and
  are cropped away; a finished block is committed by the next block's first round ("fused
  commit": queries [finished block | new block], block-causal), exactly as the Megatron sampler.
Masks are passed as 4D additive float masks, which transformers uses as given.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class DecodeSettings:
    block_size: int
    token_shift: bool
    mask_token_id: int
    vocab_size: int  # ids >= this (padding rows) and the mask token are never predicted
    steps_per_block: int
    remasking: str  # "static" | "dynamic"
    threshold: float
    temperature: float  # 0 = greedy
    top_k: int
    top_p: float
    use_cache: bool

    def validate(self) -> None:
        if not 1 <= self.steps_per_block <= self.block_size:
            raise ValueError(
                f"steps_per_block={self.steps_per_block} must be in [1, block size "
                f"{self.block_size}]: each round must unmask at least one token"
            )
        if self.remasking not in ("static", "dynamic"):
            raise ValueError(f"remasking={self.remasking!r}: choose 'static' or 'dynamic'")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold} must be in (0, 1]")
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"temperature={self.temperature} (>= 0), top_k={self.top_k} (>= 0), "
                f"top_p={self.top_p} (in (0, 1]) out of range"
            )


# ----------------------------------------------------------------------------- masks


def aligned_block_ids(positions: torch.Tensor, response_start: int, block_size: int):
    return torch.div(positions - response_start, block_size, rounding_mode="floor")


def block_diffusion_mask(query_block, query_noisy, key_block, key_noisy, key_valid, offset):
    """[b, 1, s_q, s_k] bool, True = masked out (the rule of megatron_opdlm.models.masks)."""
    qb, kb = query_block[:, :, None], key_block[:, None, :]
    qn, kn = query_noisy[:, :, None], key_noisy[:, None, :]
    allowed = (~kn & ((~qn & (kb <= qb)) | (qn & (kb < qb)))) | (kn & qn & (kb == qb))
    allowed = allowed & key_valid[:, None, :]
    s_q, s_k = query_block.shape[1], key_block.shape[1]
    rows = torch.arange(s_q, device=allowed.device)
    cols = rows + offset
    inside = cols < s_k
    rows, cols = rows[inside], cols[inside]
    allowed[:, rows, cols] |= ~key_valid[:, cols]  # an invalid query sees itself (finite softmax)
    return ~allowed[:, None]


def clean_mask(key_valid: torch.Tensor, response_start: int, block_size: int, offset: int = 0):
    """Block-causal mask of queries [offset, s_k) over clean keys [0, s_k): [b, 1, q, s_k]."""
    b, s_k = key_valid.shape
    blocks = aligned_block_ids(
        torch.arange(s_k, device=key_valid.device), response_start, block_size
    ).expand(b, -1)
    clean = torch.zeros(b, s_k, dtype=torch.bool, device=key_valid.device)
    return block_diffusion_mask(
        blocks[:, offset:], clean[:, offset:], blocks, clean, key_valid, offset
    )


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = masked) -> the additive float mask transformers' attention adds."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        mask, torch.finfo(dtype).min
    )


def model_logits(model, tokens, positions, mask, rows, cache=None) -> torch.Tensor:
    """Logits [b, n, V] (float32) at query `rows` of one forward with a custom 4D mask."""
    # transformers >= 5.24 names the cache argument `cache` (`past_key_values` before)
    cache_name = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else ("past_key_values")
    )
    out = model(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=additive(mask, model.dtype),
        use_cache=cache is not None,
        logits_to_keep=rows,
        **{cache_name: cache},
    )
    return out.logits.float()


# ----------------------------------------------------------------------------- proposals


def invalid_ids(vocab_rows: int, settings: DecodeSettings, device) -> torch.Tensor:
    ids = torch.arange(vocab_rows, device=device)
    return (ids >= settings.vocab_size) | (ids == settings.mask_token_id)


def _filter_top_k(logits, top_k):
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits, top_p):
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p  # the top token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _inverse_cdf(probs, uniform):
    cdf = probs.cumsum(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    last_with_mass = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
    zero_mass = probs.gather(-1, tokens[:, None]).squeeze(-1) <= 0
    return torch.where(zero_mass, last_with_mass, tokens)


def propose(logits: torch.Tensor, settings: DecodeSettings, uniform):
    """logits [n, V] (invalid ids -inf) -> (tokens [n], confidence [n], processed scores [n, V])."""
    logits = logits.float()
    model_probs = logits.softmax(dim=-1)
    if settings.temperature == 0:
        tokens, scores = logits.argmax(dim=-1), logits
    else:
        scores = _filter_top_p(
            _filter_top_k(logits / settings.temperature, settings.top_k), settings.top_p
        )
        tokens = _inverse_cdf(scores.softmax(dim=-1), uniform.to(logits.device).float())
    return tokens, model_probs.gather(-1, tokens[:, None]).squeeze(-1), scores


# ----------------------------------------------------------------------------- remasking


def round_schedule(block_size: int, steps_per_block: int) -> list[int]:
    counts, left = [], block_size
    for rounds_left in range(steps_per_block, 0, -1):
        counts.append(-(-left // rounds_left))
        left -= counts[-1]
    return counts


def _most_confident(confidence, masked, count):
    scores = confidence.masked_fill(~masked, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank.scatter_(1, order, positions)
    return masked & (rank < count[:, None])


def _rounds_floor(masked, round_index, steps_per_block):
    rounds_left = max(1, steps_per_block - round_index)
    return torch.div(masked.sum(dim=1) + rounds_left - 1, rounds_left, rounding_mode="floor")


def remask(confidence, masked, round_index, settings: DecodeSettings) -> torch.Tensor:
    """[b, B] bool: the masked positions this round unmasks."""
    steps = settings.steps_per_block
    floor = _rounds_floor(masked, round_index, steps)
    if settings.remasking == "static":
        scheduled = round_schedule(masked.shape[1], steps)[min(round_index, steps - 1)]
        count = torch.maximum(torch.full_like(floor, scheduled), floor)
        return _most_confident(confidence, masked, count)
    above = masked & (confidence > settings.threshold)
    return above | _most_confident(confidence, masked, floor.clamp(min=1))


# ----------------------------------------------------------------------------- forwards


def _rows(*ranges, device):
    parts = [torch.arange(lo, hi, device=device) for lo, hi in ranges]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


class FullForward:
    """No cache: every round runs [prompt | committed blocks | block]."""

    def __init__(self, model, prompt, key_valid, settings: DecodeSettings):
        self.model, self.prompt, self.key_valid, self.s = model, prompt, key_valid, settings
        self.committed: list[torch.Tensor] = []

    def block_logits(self, x, masked):
        sequence = torch.cat([self.prompt, *self.committed, x], dim=1)  # [b, L]
        b, length = sequence.shape
        bs = self.s.block_size
        mask = clean_mask(self.key_valid[:, :length], self.prompt.shape[1], bs)
        positions = torch.arange(length, device=x.device).expand(b, -1)
        first = length - bs - 1 if self.s.token_shift else length - bs
        return model_logits(
            self.model, sequence, positions, mask, _rows((first, first + bs), device=x.device)
        )

    def finish_block(self, x):
        self.committed.append(x)


class CachedForward:
    """Prompt and finished blocks encoded once; rounds run the block (and the fused commit)."""

    def __init__(self, model, prompt, key_valid, settings: DecodeSettings):
        self.model, self.key_valid, self.s = model, key_valid, settings
        self.prompt_length = p = prompt.shape[1]
        self.cache = DynamicCache()  # full-attention layers whatever the config says
        self.offset = 0
        self.pending = self.carry = None
        rows = (
            _rows((p - 1, p), device=prompt.device)
            if settings.token_shift
            else _rows(device=prompt.device)
        )
        logits = self._forward(prompt, rows, keep=p)
        if settings.token_shift:
            self.carry = logits[:, 0]

    def _forward(self, queries, rows, keep: int):
        """One forward of `queries` at columns offset..; the first `keep` of them stay cached."""
        b, n = queries.shape
        keys = self.offset + n
        positions = torch.arange(self.offset, keys, device=queries.device).expand(b, -1)
        mask = clean_mask(
            self.key_valid[:, :keys], self.prompt_length, self.s.block_size, self.offset
        )
        logits = model_logits(self.model, queries, positions, mask, rows, self.cache)
        if n > keep:  # a round's K/V held masks: drop them, the next round rewrites the slots
            self.cache.crop(keep - n)
        self.offset += keep
        return logits

    def block_logits(self, x, masked):
        bs, shift = self.s.block_size, self.s.token_shift
        # with token shift, position 0 reads the carry: a round where only position 0 is still
        # masked needs no block forward
        need_block = bool(masked[:, 1:].any()) if shift else True
        queries, ranges, block_start = [], [], 0
        if self.pending is not None:
            queries.append(self.pending)
            if shift:
                ranges.append((bs - 1, bs))
            block_start = bs
        if need_block:
            queries.append(x)
            ranges.append((block_start, block_start + (bs - 1 if shift else bs)))
        logits = None
        if queries:
            fused = self.pending is not None  # the finished block's K/V are clean now: keep them
            logits = self._forward(
                torch.cat(queries, dim=1), _rows(*ranges, device=x.device), bs if fused else 0
            )
            if fused:
                self.pending = None
                if shift:
                    self.carry, logits = logits[:, 0], logits[:, 1:]
        if not shift:
            return logits
        block_rows = logits if need_block else self.carry[:, None].expand(-1, bs - 1, -1)
        return torch.cat([self.carry[:, None], block_rows], dim=1)  # [b, B, V]

    def finish_block(self, x):
        self.pending = x


# ----------------------------------------------------------------------------- decoding


@dataclass
class DecodeResult:
    response: torch.Tensor  # [b, R] long, pad after each row's length
    lengths: torch.Tensor  # [b] tokens up to and including EOS (or the cap)
    num_forwards: torch.Tensor  # [b] rounds each row took part in
    step_map: torch.Tensor  # [b, R] round that unmasked each token, -1 past the length
    logits: torch.Tensor | None  # [b, R, V] raw logits of the round that unmasked each token
    scores: torch.Tensor | None  # [b, R, V] processed (temperature / top-k / top-p) scores


@torch.no_grad()
def decode(
    model,
    prompt: torch.Tensor,  # [b, P] long, left-padded
    prompt_valid: torch.Tensor,  # [b, P] bool
    settings: DecodeSettings,
    num_blocks: int,
    eos_ids: list[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    keep_logits: bool = False,
    on_block=None,  # on_block(response [b, w], lengths [b], new_done [b]) -> [b] bool stop
) -> DecodeResult:
    settings.validate()
    b, device, bs = prompt.shape[0], prompt.device, settings.block_size
    width = num_blocks * bs
    response = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    step_map = torch.full((b, width), -1, dtype=torch.long, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    forwards = torch.zeros(b, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    key_valid = torch.cat([prompt_valid, torch.ones_like(response, dtype=torch.bool)], dim=1)
    kept_logits = kept_scores = None
    path = CachedForward if settings.use_cache else FullForward
    forward = path(model, prompt, key_valid, settings)
    blocks = 0
    for block in range(num_blocks):
        if done.all():
            break
        active = ~done
        x = torch.where(active, settings.mask_token_id, pad_id)[:, None].repeat(1, bs)
        masked = active[:, None].expand(b, bs).clone()
        columns = slice(block * bs, (block + 1) * bs)
        for round_index in range(settings.steps_per_block):
            if not masked.any():
                break
            logits = forward.block_logits(x, masked)  # [b, B, V]
            logits = logits.masked_fill(invalid_ids(logits.shape[-1], settings, device), -torch.inf)
            uniform = None
            if settings.temperature > 0:
                gen_device = generator.device if generator is not None else "cpu"
                uniform = torch.rand((b, bs), generator=generator, device=gen_device).to(device)
            tokens, confidence, scores = propose(
                logits.reshape(b * bs, -1),
                settings,
                None if uniform is None else uniform.reshape(-1),
            )
            tokens, confidence = tokens.view(b, bs), confidence.view(b, bs)
            select = remask(confidence, masked, round_index, settings) & masked
            forwards += masked.any(dim=1).long()
            x = torch.where(select, tokens, x)
            masked &= ~select
            step_map[:, columns].masked_fill_(select, round_index)
            if keep_logits:
                if kept_logits is None:
                    kept_logits = logits.new_zeros(b, width, logits.shape[-1])
                    kept_scores = logits.new_zeros(b, width, logits.shape[-1])
                kept_logits[:, columns][select] = logits[select]
                kept_scores[:, columns][select] = scores.view(b, bs, -1)[select]
        response[:, columns] = torch.where(active[:, None], x, response[:, columns])
        forward.finish_block(x)
        is_eos = torch.isin(x, eos) & active[:, None]
        has_eos = is_eos.any(dim=1)
        block_length = torch.where(has_eos, is_eos.long().argmax(dim=1) + 1, bs)
        lengths += torch.where(active, block_length, 0)
        done |= has_eos
        blocks += 1
        if on_block is not None:
            stop = on_block(response[:, : blocks * bs], lengths, active)
            if stop is not None:
                done |= stop.to(device) & active
    width = blocks * bs
    valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
    response = torch.where(valid, response[:, :width], pad_id)
    step_map = torch.where(valid, step_map[:, :width], -1)
    if kept_logits is not None:
        kept_logits, kept_scores = kept_logits[:, :width], kept_scores[:, :width]
    return DecodeResult(response, lengths, forwards, step_map, kept_logits, kept_scores)
