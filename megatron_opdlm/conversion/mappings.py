"""Declarative HF <-> Megatron tensor mappings, written once and shared by every family.

A mapping relates one Megatron checkpoint key (global, layout-free; layer tensors stacked under
`decoder.layers.*` with a leading layer axis) to one or more HF tensors by *row segments*: rows
[start, stop) of the Megatron tensor (per layer, after the layer axis) come from rows
[hf_start, ...) of one HF tensor, or are filled (zero padding, the mean-embedding mask row).
Tensor-parallel splits never appear here: checkpoints are layout-free and Megatron reshards on
load, so a conversion only has to place rows.

    Direct       same tensor                      norms, o_proj, down_proj
    Stacked      rows concatenated                gated MLP: linear_fc1 = [gate; up]
    FusedQKV     per query group [q_g; k_g; v_g]  GQA-interleaved linear_qkv (weight or bias)
    Vocab        rows padded to the padded vocab  embedding / output layer
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_opdlm.config import ModelConfig

LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class Segment:
    start: int  # first Megatron row
    stop: int
    source: int | None  # index into the mapping's HF names; None = filled, not read
    hf_start: int = 0
    fill: str = "zero"  # for source None: "zero" | "mean" (mean of the real embedding rows)


@dataclass(frozen=True)
class Dims:
    """Sizes the symbolic shapes refer to."""

    model: ModelConfig
    hf_vocab_rows: int  # rows of the HF embedding / lm_head

    def size(self, symbol: str) -> int:
        m = self.model
        d = m.kv_channels
        return {
            "h": m.hidden_size, "f": m.ffn_hidden_size, "d": d,
            "q": m.num_attention_heads * d, "kv": m.num_query_groups * d,
            "v": self.hf_vocab_rows, "V": m.padded_vocab_size,
        }[symbol]  # fmt: skip

    def shape(self, symbols: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.size(s) for s in symbols)


@dataclass(frozen=True)
class Mapping:
    megatron: str
    hf: tuple[str, ...]  # HF names; "{i}" is the layer number

    @property
    def layered(self) -> bool:
        return self.megatron.startswith(LAYER_PREFIX)

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [name.format(i=layer) for name in self.hf]

    def shape(self, dims: Dims) -> tuple[int, ...]:  # per layer
        raise NotImplementedError

    def hf_shapes(self, dims: Dims) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def segments(self, dims: Dims) -> list[Segment]:
        raise NotImplementedError


@dataclass(frozen=True)
class Direct(Mapping):
    dims: tuple[str, ...] = ()

    def shape(self, dims):
        return dims.shape(self.dims)

    def hf_shapes(self, dims):
        return [dims.shape(self.dims)]

    def segments(self, dims):
        return [Segment(0, dims.size(self.dims[0]), 0)]


@dataclass(frozen=True)
class Stacked(Mapping):
    """Megatron rows = HF tensors' rows one after the other (each of shape `dims`)."""

    dims: tuple[str, ...] = ()

    def shape(self, dims):
        rows, *rest = dims.shape(self.dims)
        return (rows * len(self.hf), *rest)

    def hf_shapes(self, dims):
        return [dims.shape(self.dims)] * len(self.hf)

    def segments(self, dims):
        rows = dims.size(self.dims[0])
        return [Segment(i * rows, (i + 1) * rows, i) for i in range(len(self.hf))]


@dataclass(frozen=True)
class FusedQKV(Mapping):
    """hf = (q, k, v). Megatron interleaves per query group g: r = heads / groups query heads,
    then one key and one value head: [q_g (r*d rows); k_g (d); v_g (d)]. Bias: the same in 1-D."""

    bias: bool = False

    def _tail(self, dims):
        return () if self.bias else (dims.size("h"),)

    def shape(self, dims):
        return (dims.size("q") + 2 * dims.size("kv"), *self._tail(dims))

    def hf_shapes(self, dims):
        tail = self._tail(dims)
        return [(dims.size("q"), *tail), (dims.size("kv"), *tail), (dims.size("kv"), *tail)]

    def segments(self, dims):
        m, d = dims.model, dims.size("d")
        r = m.num_attention_heads // m.num_query_groups
        out, row = [], 0
        for g in range(m.num_query_groups):
            for source, rows, hf_start in ((0, r * d, g * r * d), (1, d, g * d), (2, d, g * d)):
                out.append(Segment(row, row + rows, source, hf_start))
                row += rows
        return out


@dataclass(frozen=True)
class Vocab(Mapping):
    """[V_padded, h]: the HF rows, then (input embedding of a model that adds the student's mask
    row) the mean real-token embedding at row vocab_size, then zero padding."""

    mask_row_mean: bool = False

    def shape(self, dims):
        return dims.shape(("V", "h"))

    def hf_shapes(self, dims):
        return [dims.shape(("v", "h"))]

    def segments(self, dims):
        rows, padded = dims.size("v"), dims.size("V")
        out = [Segment(0, rows, 0)]
        m = dims.model
        if self.mask_row_mean and m.adds_mask_row and rows == m.vocab_size:
            out.append(Segment(rows, rows + 1, None, fill="mean"))
            rows += 1
        if rows < padded:
            out.append(Segment(rows, padded, None, fill="zero"))
        return out


def overlapping(segments: list[Segment], start: int, stop: int):
    """(segment, lo, hi) for each segment overlapping Megatron rows [start, stop)."""
    for seg in segments:
        lo, hi = max(start, seg.start), min(stop, seg.stop)
        if lo < hi:
            yield seg, lo, hi
