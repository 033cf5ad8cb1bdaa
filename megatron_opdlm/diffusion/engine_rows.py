"""Per-row pieces of the rollout engine: masks of slot rows, per-sequence random streams, and a
per-row logit projection.

Slot layout (`slot_cache`): every sequence is left-aligned in its own cache slot, column =
position; its prompt blocks are aligned to its own response start (the sampler's block-causal
prompt, whatever the other rows' lengths).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from megatron_opdlm.models import mask_functions
from megatron_opdlm.models.projection import project_rows_gathered

# round_callback(sequences [a], blocks [a], rounds [a], logits [a, B, V], x [a, B], masked [a, B],
# select [a, B]): on the last pipeline stage after each round's decisions; row i is sequence
# sequences[i] (its index in the prompts), at its own block and round.
RowRoundCallback = Callable[..., None]

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (
    _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB),
)  # fmt: skip


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrap-around multiplication)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def sequence_keys(prompts: list[list[int]]) -> list[int]:
    """One key per sequence: its prompt's content and its occurrence among equal prompts, so the
    key does not depend on where the prompt stands in the list."""
    seen: Counter = Counter()
    keys = []
    for prompt in prompts:
        content = tuple(prompt)
        digest = torch.tensor([_signed(hash(content)), seen[content]], dtype=torch.long)
        keys.append(int(_mix(_mix(digest[0:1]) ^ digest[1:2])))
        seen[content] += 1
    return keys


def sequence_uniform(
    seed: int,
    keys: torch.Tensor,  # [a] long, sequence keys
    blocks: torch.Tensor,  # [a] long
    rounds: torch.Tensor,  # [a] long
    width: int,
) -> torch.Tensor:
    """[a, width] float32 in [0, 1): a counter-based stream per (seed, sequence, block, round,
    position), computed on the CPU (the same numbers on every device and rank)."""
    keys = keys.cpu().long()
    state = _mix(torch.full_like(keys, _signed(seed)) ^ keys)  # [a]
    counter = blocks.cpu().long() * 65_536 + rounds.cpu().long()  # rounds <= block size
    state = _mix(state ^ _mix(counter))[:, None] + torch.arange(width)[None, :]  # [a, width]
    bits = _shift_right(_mix(state), 40)  # the top 24 bits: exact in float32
    return bits.float() / float(1 << 24)


def prefill_mask(lengths: torch.Tensor, width: int, block_size: int) -> torch.Tensor:
    """[a, 1, width, width] bool, True = masked out: prompts right-padded to `width`, each
    block-causal with blocks aligned to its own end; a pad query sees only itself."""
    columns = torch.arange(width)[None, :]  # [1, P]
    valid = columns < lengths[:, None]  # [a, P]
    block = torch.div(columns - lengths[:, None], block_size, rounding_mode="floor")  # [a, P]
    noisy = torch.zeros_like(valid)
    descriptor = mask_functions.descriptor(block, noisy, valid)  # [a, 3, P]
    return mask_functions.dense_mask(descriptor)


def round_mask(starts: torch.Tensor, block_size: int) -> torch.Tensor:
    """[r, 1, B, end] bool, True = masked out: batch row i (queries at columns [start_i,
    start_i + B) of its slot) sees its slot's columns [0, start_i + B): the committed prefix and
    its own block (bidirectional), never a key past its end (other rows reach further)."""
    ends = starts + block_size  # [r]
    keys = torch.arange(int(ends.max()))  # [end]
    hidden = keys[None, :] >= ends[:, None]  # [r, end]
    return hidden[:, None, None, :].expand(-1, 1, block_size, -1)


def per_row_projection(*, hidden_states: torch.Tensor, context: torch.Tensor, **kwargs):
    """An output processor projecting rows context[i] of batch row i (context [b, n] long);
    hidden_states [s, b, h]. Returns [b, n, V] (gathered over TP)."""
    index = context.t()[:, :, None].expand(-1, -1, hidden_states.shape[-1])  # [n, b, h]
    picked = hidden_states.gather(0, index)  # [n, b, h]
    rows = torch.arange(picked.shape[0], device=picked.device)
    return project_rows_gathered(hidden_states=picked, context=rows, **kwargs)
