"""The project's Megatron checkpoint (saved at any TP/PP) -> Hugging Face safetensors, streaming.

The output layout is known from the config before any weight is read, so every safetensors
shard is created with its header up front and each stored chunk of the checkpoint is read once
and scattered straight to its rows in the HF tensors (q/k/v rows out of the interleaved groups,
gate/up out of linear_fc1, padding rows dropped). Memory is one stored chunk. An AR model keeps
`vocab_size` embedding rows; a student keeps its added mask row and records its diffusion
settings in config.json (`hf_config.hf_config_from_model`), and is written as a DLM
(`hf_export.export`): its own model_type and remote code whose `generate` decodes block-wise,
decoding defaults in config.json, a model card.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from megatron_opdlm import checkpoint_layout
from megatron_opdlm.conversion.dist_reader import DistCheckpointReader
from megatron_opdlm.conversion.families import mappings_for
from megatron_opdlm.conversion.hf_config import export_vocab_rows, hf_config_from_model
from megatron_opdlm.conversion.hf_to_megatron import DTYPES, _progress
from megatron_opdlm.conversion.mappings import Dims, Mapping, overlapping
from megatron_opdlm.conversion.safetensors_io import INDEX_FILE, ShardWriter
from megatron_opdlm.hf_export.export import check_decoding, default_decoding, write_dlm_files
from megatron_opdlm.runtime.logging import get_logger

log = get_logger(__name__)
CONFIG_FILE = "config.yaml"  # the trainer's resolved JobConfig beside a saved student
_HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def _check_keys(reader: DistCheckpointReader, mappings: list[Mapping], dims: Dims) -> None:
    expected = {}
    for m in mappings:
        shape = m.shape(dims)
        expected[m.megatron] = (dims.model.num_layers, *shape) if m.layered else shape
    stored = set(reader.tensors)
    missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
    wrong = [
        f"{k}: {reader.shape(k)} (expected {v})"
        for k, v in expected.items()
        if k in stored and reader.shape(k) != tuple(v)
    ]
    if missing or extra or wrong:
        raise ValueError(
            f"checkpoint {reader.directory} does not match its opdlm_model.yaml: missing "
            f"{missing}, unexpected {extra}, shape mismatches {wrong}"
        )


def _hf_layout(mappings, dims, reader, dtype):
    """[(hf name, shape, dtype)] in HF order: embedding, layer by layer, norm, head."""
    layers = dims.model.num_layers
    out = []

    def add(m: Mapping, layer):
        for name, shape in zip(m.hf_names(layer), m.hf_shapes(dims), strict=True):
            out.append((name, shape, dtype or reader.dtype(m.megatron)))

    for m in mappings:
        if not m.layered and m.megatron.startswith("embedding."):
            add(m, None)
    for layer in range(layers):
        for m in mappings:
            if m.layered:
                add(m, layer)
    for m in mappings:
        if not m.layered and not m.megatron.startswith("embedding."):
            add(m, None)
    return out


def _plan_shards(layout, max_shard_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for name, shape, dtype in layout:
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, dtype))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _scatter(reader, mapping: Mapping, dims: Dims, writers: dict, on_chunk, prefetch) -> None:
    """Read each stored chunk of `mapping.megatron` once; write its rows into the HF tensors."""
    segments = mapping.segments(dims)
    for offsets, data in reader.chunks(mapping.megatron, prefetch):
        if not mapping.layered:  # add a layer axis of one
            offsets, data = (0, *offsets), data.unsqueeze(0)
        layer0, row0 = offsets[0], offsets[1]
        col0 = offsets[2] if len(offsets) > 2 else 0
        rows = data.shape[1]
        for j in range(data.shape[0]):  # [layers in chunk, rows, (cols)]
            names = mapping.hf_names(layer0 + j if mapping.layered else None)
            for seg, lo, hi in overlapping(segments, row0, row0 + rows):
                if seg.source is None:
                    continue  # padding / mask row of an AR model: not an HF tensor
                name = names[seg.source]
                block = data[j, lo - row0 : hi - row0]
                writers[name].write_block(name, seg.hf_start + lo - seg.start, col0, block)
        on_chunk(data.nbytes)
        del data


def convert_megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    dtype: str | None = None,
    max_shard_gb: float = 5.0,
    progress: bool = False,
    prefetch: bool = True,
    decoding: dict | None = None,
) -> dict:
    """Export; returns {"out": path, "bytes": written, "seconds": wall, "dlm": a student}.

    `decoding`: a student's decoding defaults recorded in config.json (keys of
    hf_export.export.default_decoding; missing keys take those defaults).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        raise ValueError(f"output directory {out_dir} exists; remove it or choose another --out")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {sorted(DTYPES)}")
    ckpt_dir = checkpoint_layout.resolve_checkpoint_dir(ckpt_dir)
    model_cfg, diffusion_cfg = checkpoint_layout.read_model_meta(ckpt_dir)
    dims = Dims(model_cfg, export_vocab_rows(model_cfg, diffusion_cfg))
    if diffusion_cfg is not None:
        decoding = {
            **default_decoding(diffusion_cfg.block_size, ckpt_dir / CONFIG_FILE),
            **(decoding or {}),
        }
        check_decoding(decoding, diffusion_cfg.block_size)
    mappings = mappings_for(model_cfg)
    out_dtype = DTYPES[dtype] if dtype else None
    with DistCheckpointReader(ckpt_dir / checkpoint_layout.MODEL_DIR) as reader:
        _check_keys(reader, mappings, dims)
        layout = _hf_layout(mappings, dims, reader, out_dtype)
        shards = _plan_shards(layout, int(max_shard_gb * 2**30))
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        files = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        writers, weight_map = {}, {}
        for fname, tensors in zip(files, shards, strict=True):
            writer = ShardWriter(tmp / fname, tensors)
            for name, _, _ in tensors:
                writers[name], weight_map[name] = writer, fname
        total = sum(
            reader.tensors[m.megatron].size.numel() * reader.dtype(m.megatron).itemsize
            for m in mappings
        )
        bar = _progress(total, progress)
        try:
            for mapping in mappings:
                _scatter(reader, mapping, dims, writers, bar.update, prefetch)
        finally:
            bar.close()
        for writer in {id(w): w for w in writers.values()}.values():
            writer.close()  # raises if a tensor was not completely written
        written = sum(w.size for w in {id(w): w for w in writers.values()}.values())
        stored_dtype = out_dtype or reader.dtype("embedding.word_embeddings.weight")
    if len(shards) > 1:
        index = {"metadata": {"total_size": written}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    hf = hf_config_from_model(model_cfg, diffusion_cfg, _HF_DTYPE_NAMES[stored_dtype])
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    tokenizer = ckpt_dir / checkpoint_layout.TOKENIZER_DIR
    if tokenizer.is_dir():
        for item in tokenizer.iterdir():
            shutil.copy2(item, tmp / item.name)
    if diffusion_cfg is not None:
        write_dlm_files(tmp, model_cfg, diffusion_cfg, decoding)
    tmp.rename(out_dir)
    seconds = time.perf_counter() - start
    log.info("exported %s -> %s (%.1f MiB in %.1f s)", ckpt_dir, out_dir, written / 2**20, seconds)
    return {"out": out_dir, "bytes": written, "seconds": seconds, "dlm": diffusion_cfg is not None}
