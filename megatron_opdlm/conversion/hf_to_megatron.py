"""Hugging Face safetensors -> the project's Megatron checkpoint, streaming.

Every check runs before anything is written (architecture, layout, tensor names, shapes). The
checkpoint is then written chunk by chunk: each chunk of a Megatron tensor (a block of rows of
one layer, at most `max_chunk_mb`) is read from the HF files straight into place (q/k/v rows
into their interleaved slots, gate/up into the two halves of linear_fc1, padding rows zeroed)
and dropped once written, so peak memory is a chunk, not the model. The result is layout-free:
the target TP/PP/VPP are checked here, and Megatron reshards when it loads.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from megatron_opdlm import checkpoint_layout
from megatron_opdlm.config import ModelConfig, ParallelConfig, validate_layout
from megatron_opdlm.conversion.dist_writer import LazyTensor, sharded_object, write_torch_dist
from megatron_opdlm.conversion.families import (
    EXTRA_STATE_MODULES,
    IGNORED_HF_SUFFIXES,
    mappings_for,
)
from megatron_opdlm.conversion.hf_config import (
    diffusion_config_from_hf,
    export_vocab_rows,
    model_config_from_hf,
)
from megatron_opdlm.conversion.mappings import Dims, Mapping, overlapping
from megatron_opdlm.conversion.safetensors_io import SafetensorsReader
from megatron_opdlm.models.builder import TORCH_DTYPES
from megatron_opdlm.runtime.logging import get_logger

log = get_logger(__name__)
DTYPES = TORCH_DTYPES


def read_hf_config(hf_dir: str | Path, name: str = "config.json") -> dict:
    path = Path(hf_dir) / name
    if not path.is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); give the model's {name}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object; give the model's {name}")
    return hf


def check_hf_tensors(reader: SafetensorsReader, mappings: list[Mapping], dims: Dims) -> None:
    """Missing, unexpected and mis-shaped HF tensors, all named in one error."""
    expected: dict[str, tuple[int, ...]] = {}
    layers = range(dims.model.num_layers)
    for mapping in mappings:
        shapes = mapping.hf_shapes(dims)
        for layer in layers if mapping.layered else [None]:
            expected.update(zip(mapping.hf_names(layer), shapes, strict=True))
    present = set(reader.entries)
    missing = sorted(set(expected) - present)
    extra = sorted(n for n in present - set(expected) if not n.endswith(IGNORED_HF_SUFFIXES))
    if dims.model.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some tied checkpoints store the shared matrix twice
        log.info("tie_word_embeddings: ignoring the stored copy lm_head.weight")
    wrong = [
        f"{n}: {tuple(reader.entries[n].shape)} (expected {shape})"
        for n, shape in expected.items()
        if n in present and tuple(reader.entries[n].shape) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:20]}" + (" ..." if len(missing) > 20 else ""))
    if extra:
        problems.append(f"unexpected tensors {extra[:20]}" + (" ..." if len(extra) > 20 else ""))
    if wrong:
        problems.append("shape mismatches " + "; ".join(wrong[:20]))
    if problems:
        raise ValueError(
            f"HF checkpoint does not match its config.json ({dims.model.family}): "
            + " | ".join(problems)
        )
    not_float = sorted(n for n in expected if not reader.entries[n].dtype.is_floating_point)
    if not_float:
        raise ValueError(
            f"tensors are not floating point (quantised checkpoint?): {not_float[:10]}"
        )


class _MeanRow:
    """Mean of the real embedding rows (the added mask row), summed while the embedding chunks
    are written (they come first, in row order), so the embedding is read once. Rows not seen
    when the mean is needed (another write order) are read then: correct in any order."""

    def __init__(self, reader: SafetensorsReader, name: str, vocab: int):
        self.reader, self.name, self.vocab = reader, name, vocab
        self.sums: dict[tuple[int, int], torch.Tensor] = {}

    @staticmethod
    def _sum(rows: torch.Tensor) -> torch.Tensor:
        """[n, h] -> [h] float64. 16-bit rows are summed 256 at a time in fp32 (8 significant
        bits each: nearly exact, 5x faster than casting 1 GB to fp64), the rest in fp64."""
        total = torch.zeros(rows.shape[1], dtype=torch.float64)
        half = rows.dtype in (torch.bfloat16, torch.float16)
        step = 256 if half else 1024
        for i in range(0, rows.shape[0], step):  # bounded temporaries
            block = rows[i : i + step]
            total += block.float().sum(0).double() if half else block.double().sum(0)
        return total

    def add(self, row0: int, rows: torch.Tensor) -> None:
        self.sums[(row0, row0 + rows.shape[0])] = self._sum(rows)  # [h] float64

    def value(self) -> torch.Tensor:
        covered = sorted(self.sums)
        gaps, pos = [], 0
        for r0, r1 in covered + [(self.vocab, self.vocab)]:
            if r0 > pos:
                gaps.append((pos, r0))
            pos = max(pos, r1)
        for r0, r1 in gaps:
            for b0 in range(r0, r1, 8192):
                self.add(b0, self.reader.read_rows(self.name, b0, min(r1, b0 + 8192)))
        return sum(self.sums.values()) / self.vocab  # [h]


class _ChunkMaker:
    """Produces chunks into one reused buffer: the streaming writer serialises each chunk before
    asking for the next, and a fresh 128 MiB allocation per chunk costs page faults."""

    def __init__(self, reader: SafetensorsReader, dtype: torch.dtype, max_chunk_bytes: int):
        self.reader, self.dtype = reader, dtype
        self.buffer = bytearray(max_chunk_bytes)
        self.mean: _MeanRow | None = None

    def make(self, names, segments, row0, row1, tail, sizes, mean_source: bool):
        def produce() -> torch.Tensor:
            count = (row1 - row0) * int(torch.Size(tail).numel())
            out = torch.frombuffer(self.buffer, dtype=self.dtype, count=count)
            out = out.view(row1 - row0, *tail)  # [rows, ...]
            for seg, lo, hi in overlapping(segments, row0, row1):
                dest = out[lo - row0 : hi - row0]
                if seg.source is None:
                    if seg.fill == "mean":  # the student's added mask row
                        dest.copy_(self.mean.value().to(self.dtype).expand_as(dest))
                    else:
                        dest.zero_()
                    continue
                name, first = names[seg.source], seg.hf_start + lo - seg.start
                if self.reader.entries[name].dtype == self.dtype:  # read straight into place
                    source = self.reader.read_rows_into(name, first, first + hi - lo, dest)
                else:
                    source = self.reader.read_rows(name, first, first + hi - lo)
                    dest.copy_(source)
                if mean_source and self.mean is not None:
                    self.mean.add(first, source)
            return out.view(sizes)

        return produce


def build_lazy_state(
    reader: SafetensorsReader, mappings: list[Mapping], dims: Dims, dtype, max_bytes: int
) -> dict:
    """{checkpoint key: LazyTensor | serialised object} exactly as a Megatron model saves it.

    The chunks share one buffer: write them with `write_torch_dist` (one chunk at a time)."""
    model = dims.model
    layers = model.num_layers
    plans = []
    for mapping in mappings:
        shape = mapping.shape(dims)
        row_bytes = dtype.itemsize * int(torch.Size(shape[1:]).numel())
        plans.append((mapping, shape, max(1, max_bytes // row_bytes), row_bytes))
    maker = _ChunkMaker(reader, dtype, max(min(s[0], step) * rb for _, s, step, rb in plans))
    embedding = "model.embed_tokens.weight"
    if model.adds_mask_row and dims.hf_vocab_rows == model.vocab_size:
        maker.mean = _MeanRow(reader, embedding, model.vocab_size)
    state: dict = {}
    for mapping, shape, step, _ in plans:
        segments = mapping.segments(dims)
        rows, tail = shape[0], shape[1:]
        chunks = []
        for layer in range(layers) if mapping.layered else [None]:
            names = mapping.hf_names(layer)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                lead = () if layer is None else (layer,)
                offsets = (*lead, r0, *(0,) * len(tail))
                sizes = (*(1,) * len(lead), r1 - r0, *tail)
                fn = maker.make(names, segments, r0, r1, tail, sizes, names == [embedding])
                chunks.append((offsets, sizes, fn))
        global_shape = (layers, *shape) if mapping.layered else shape
        state[mapping.megatron] = LazyTensor(global_shape, dtype, chunks)
    for layer in range(layers):
        for module in EXTRA_STATE_MODULES:  # None: no FP8 metadata (local and TE layers alike)
            key = f"decoder.layers.{module}._extra_state/shard_{layer}_{layers}"
            state[key] = sharded_object(None)
    return state


def plan_conversion(
    hf_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    vocab_pad_multiple: int | None = None,
    mask_token_id: int | None = None,
) -> tuple[ModelConfig, object]:
    """Configs of the conversion; raises ValueError for an unsupported model or layout."""
    hf = read_hf_config(hf_dir)
    generation = Path(hf_dir) / "generation_config.json"
    generation_config = read_hf_config(hf_dir, generation.name) if generation.is_file() else None
    model_cfg = model_config_from_hf(hf, tp, generation_config, mask_token_id)
    if mask_token_id is not None and (Path(hf_dir) / "tokenizer.json").is_file():
        from megatron_opdlm.data.tokenizer import Tokenizer

        real = Tokenizer(hf_dir).vocab_size
        if mask_token_id < real:
            raise ValueError(
                f"--mask-token-id {mask_token_id} is a real token of the tokenizer (it has "
                f"{real}); name an unused row in [{real}, {model_cfg.padded_vocab_size}) or "
                "leave it out to add a row"
            )
    if vocab_pad_multiple is not None:
        model_cfg.vocab_pad_multiple = vocab_pad_multiple
        model_cfg.validate()
    parallel = ParallelConfig(tp=tp, pp=pp, vpp=vpp)
    parallel.validate()
    validate_layout(model_cfg, parallel, world_size=None)
    return model_cfg, diffusion_config_from_hf(hf)


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    vpp: int | None = None,
    dtype: str | None = None,
    max_chunk_mb: float = 128,
    vocab_pad_multiple: int | None = None,
    progress: bool = False,
    mask_token_id: int | None = None,
) -> dict:
    """Convert; returns {"out": path, "bytes": written, "seconds": wall}. One process."""
    start = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    if out_dir.exists():
        raise ValueError(f"output directory {out_dir} exists; remove it or choose another --out")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    model_cfg, diffusion_cfg = plan_conversion(
        hf_dir, tp, pp, vpp, vocab_pad_multiple, mask_token_id
    )
    dims = Dims(model_cfg, export_vocab_rows(model_cfg, diffusion_cfg))
    mappings = mappings_for(model_cfg)
    with SafetensorsReader(hf_dir) as reader:
        check_hf_tensors(reader, mappings, dims)
        out_dtype = DTYPES[dtype] if dtype else reader.entries["model.embed_tokens.weight"].dtype
        state = build_lazy_state(reader, mappings, dims, out_dtype, int(max_chunk_mb * 2**20))
        total = sum(t.numel() * t.dtype.itemsize for t in state.values() if torch.is_tensor(t))
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        bar = _progress(total, progress)
        write_torch_dist(state, tmp / checkpoint_layout.MODEL_DIR, on_chunk=bar.update)
        bar.close()
    checkpoint_layout.write_model_meta(tmp, model_cfg, diffusion_cfg)
    try:
        checkpoint_layout.copy_tokenizer(hf_dir, tmp / checkpoint_layout.TOKENIZER_DIR)
    except ValueError as exc:
        log.warning("%s: the checkpoint has no tokenizer/ directory", exc)
    tmp.rename(out_dir)
    seconds = time.perf_counter() - start
    log.info("converted %s -> %s (%.1f MiB in %.1f s)", hf_dir, out_dir, total / 2**20, seconds)
    return {"out": out_dir, "bytes": total, "seconds": seconds, "model": model_cfg}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing")
