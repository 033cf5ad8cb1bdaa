"""FlexAttention block masks from column descriptors, built cheaply and without [S, S] tensors.

A forward's block mask has two parts (`models.mask_functions` holds the rule):
- structure: which [128 x 128] tiles of the (padded) score grid hold any allowed entry, and which
  are entirely allowed, assuming every column valid. It depends only on the layout (lengths, prompt
  width, block size, noisy columns), so it is computed once per layout and cached
  (`StructureCache`), on the target device, a few query tiles at a time: O(tile x K) memory.
- per batch: padding only removes keys, so a batch's mask is a subset of the structure. A full tile
  stays full where all its keys are valid in that row, the others become partial tiles on which
  the padding-aware mask_mod runs. That refinement is O(b (S/128)^2) on tile flags.
Lengths are padded to a few buckets (`bucket_length`), so the kernel sees few shapes (few
compiles) and layouts of repeated shape share their cached structure.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask

from megatron_opdlm.models import mask_functions as mf

TILE = 128  # FlexAttention's default BLOCK_SIZE (query and key tiles)
QUERY_TILES_PER_CHUNK = 8  # structure pass: 8 query tiles x K keys of bools at a time


def bucket_length(n: int) -> int:
    """Padded length for n columns: a multiple of 128, at most 4 buckets per octave above 512
    (<= 25% padding), e.g. 300 -> 384, 1100 -> 1280, 2100 -> 2560, 9024 -> 10240."""
    if n <= 4 * TILE:
        return max(TILE, -(-n // TILE) * TILE)
    step = max(TILE, (1 << (n.bit_length() - 1)) // 4)
    return -(-n // step) * step


def padded_lengths(num_queries: int, num_keys: int) -> tuple[int, int]:
    """(Q_pad, K_pad): keys to their bucket; queries too when they are all the keys (full
    forwards), left as they are for short cached rounds (a 4-token block stays 4 queries)."""
    k_pad = bucket_length(num_keys)
    q_pad = k_pad if num_queries == num_keys else num_queries
    return q_pad, k_pad


def pad_columns(columns: torch.Tensor, length: int) -> torch.Tensor:
    """Descriptor padded at the end to `length` columns that are invalid (block 0, clean)."""
    extra = length - columns.shape[-1]
    return torch.nn.functional.pad(columns, (0, extra)) if extra > 0 else columns


@dataclass
class Structure:
    """Tile flags of one layout: any / all allowed with every column valid. [r, nq, nk] bool."""

    any_allowed: torch.Tensor
    all_allowed: torch.Tensor


def _tile_reduce(allowed: torch.Tensor, k_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[r, cq, K_pad] entries -> ([r, cq/128, K_pad/128] any, all). cq is padded to whole tiles
    with False rows, so a tile holding fewer than 128 queries is never full (it stays partial,
    which is always correct)."""
    r, cq, _ = allowed.shape
    rows = -(-cq // TILE) * TILE
    if rows != cq:
        allowed = torch.nn.functional.pad(allowed, (0, 0, 0, rows - cq))
    tiles = allowed.view(r, rows // TILE, TILE, k_pad // TILE, TILE)
    return tiles.any(dim=4).any(dim=2), tiles.all(dim=4).all(dim=2)


def structure(
    layout: torch.Tensor,  # [r, 3, >= q_off + Q_pad] padded descriptor (valid = real columns)
    num_queries: int,
    num_keys: int,
    q_pad: int,
    k_pad: int,
) -> Structure:
    """Tile flags of the predicate over the padded grid, QUERY_TILES_PER_CHUNK tiles at a time."""
    block, noisy, valid = mf.unpack(layout)  # [r, L] each
    q_off = num_keys - num_queries  # query i is column i + q_off
    k_cols = torch.arange(k_pad, device=layout.device)
    k_block, k_noisy, k_valid = (t[:, None, :k_pad] for t in (block, noisy, valid))  # [r, 1, K]
    anys, alls = [], []
    chunk = TILE * QUERY_TILES_PER_CHUNK
    for q0 in range(0, q_pad, chunk):
        q_cols = torch.arange(q0, min(q_pad, q0 + chunk), device=layout.device)
        q_cols = q_cols + q_off  # [cq] descriptor columns of these queries
        allowed = mf.allowed(
            block[:, q_cols, None], noisy[:, q_cols, None], valid[:, q_cols, None],
            k_block, k_noisy, k_valid,
            (q_cols[:, None] == k_cols[None, :])[None],
        )  # fmt: skip  # [r, cq, K_pad]
        any_allowed, all_allowed = _tile_reduce(allowed, k_pad)
        anys.append(any_allowed)
        alls.append(all_allowed)
    return Structure(torch.cat(anys, dim=1), torch.cat(alls, dim=1))


class StructureCache:
    """Structures by layout key (bucketed lengths, query offset, the layout's block ids and noisy
    flags), least recently used dropped beyond `capacity`. `builds` / `hits` count for tests and
    the benchmark."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.builds = 0
        self.hits = 0

    def get(self, key, build) -> Structure:
        if key in self.entries:
            self.entries.move_to_end(key)
            self.hits += 1
            return self.entries[key]
        value = build()
        self.builds += 1
        self.entries[key] = value
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self.entries.clear()
        self.builds = self.hits = 0


STRUCTURES = StructureCache()


def _indices(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, nq, nk] bool tile flags -> (num_blocks [b, 1, nq], indices [b, 1, nq, nk]) int32,
    the flagged key tiles of each query tile first, in order."""
    num = tiles.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[:, None], order[:, None]


def mask_mod_for(padded: torch.Tensor, num_queries: int, num_keys: int):
    """The predicate as a FlexAttention mask_mod over a padded descriptor [b, 3, L]."""
    block, noisy, valid = mf.unpack(padded)  # [b, L]
    q_off = num_keys - num_queries

    def mask_mod(b, h, q_idx, kv_idx):
        q_col = q_idx + q_off  # arithmetic offset: indexing an arange by q_idx breaks CPU codegen
        return mf.allowed(
            block[b, q_col], noisy[b, q_col], valid[b, q_col],
            block[b, kv_idx], noisy[b, kv_idx], valid[b, kv_idx],
            q_col == kv_idx,
        )  # fmt: skip

    return mask_mod


def build_block_mask(
    columns: torch.Tensor,  # [b, 3, K] descriptor
    num_queries: int,
    cache: StructureCache | None = STRUCTURES,
) -> BlockMask:
    """BlockMask over the padded grid [Q_pad, K_pad] (`padded_lengths`) for a descriptor.

    With `cache=None` the structure is recomputed (the benchmark's "no cache" column).
    """
    b, _, num_keys = columns.shape
    q_pad, k_pad = padded_lengths(num_queries, num_keys)
    q_off = num_keys - num_queries
    # long enough for the query columns of padded queries too (q_off + Q_pad)
    padded = pad_columns(columns, max(k_pad, q_off + q_pad))  # [b, 3, L]
    layout = padded[:, : mf.VALID_ROW]  # block ids and noisy flags: [b, 2, L]
    uniform = bool((layout == layout[:1]).all())
    rows = padded[:1] if uniform else padded
    real = (torch.arange(padded.shape[-1], device=columns.device) < num_keys).to(torch.int32)
    layout_all_valid = torch.cat([rows[:, :2], real.expand(rows.shape[0], 1, -1)], dim=1)

    def build() -> Structure:
        return structure(layout_all_valid, num_queries, num_keys, q_pad, k_pad)

    if cache is None or not uniform:
        struct = build()
    else:
        head = rows[0, :2, :num_keys].cpu().numpy().tobytes()
        key = (str(columns.device), num_queries, num_keys, q_pad, k_pad, head)
        struct = cache.get(key, build)
    # refine by padding: a tile stays full where every key in it is valid in that row
    valid = padded[:, mf.VALID_ROW, :k_pad].bool()  # [b, K_pad]
    keys_valid = valid.view(b, k_pad // TILE, TILE).all(dim=-1)  # [b, nk]
    full = struct.all_allowed & keys_valid[:, None, :]  # [b, nq, nk]
    partial = struct.any_allowed & ~full
    kv_num, kv_idx = _indices(partial)
    full_num, full_idx = _indices(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx,
        BLOCK_SIZE=TILE,
        mask_mod=mask_mod_for(padded, num_queries, num_keys),
        seq_lengths=(q_pad, k_pad),
    )  # fmt: skip
