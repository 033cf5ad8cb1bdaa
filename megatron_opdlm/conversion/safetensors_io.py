"""Row-level safetensors access without mmap, for conversions whose memory is bounded by a chunk.

Reading: the header is parsed once; `read_rows_into` preads rows of one tensor straight into the
memory of a destination tensor (no mmap: mapped pages of a 70B model would count as resident).
Writing: `ShardWriter` lays out a file's header from known shapes first, then accepts row ranges
(or column blocks of rows) of any tensor in any order with pwrite, and checks that every byte of
every tensor was written before the file is closed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

ST_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


def _row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape[1:]:
        n *= s
    return n


class TensorEntry:
    __slots__ = ("path", "dtype", "shape", "offset")

    def __init__(self, path: Path, dtype: torch.dtype, shape: tuple[int, ...], offset: int):
        self.path, self.dtype, self.shape, self.offset = path, dtype, shape, offset

    @property
    def nbytes(self) -> int:
        return _row_bytes(self.shape, self.dtype) * (self.shape[0] if self.shape else 1)


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """Writable byte view of a contiguous CPU tensor (any dtype, bf16 included)."""
    flat = tensor.reshape(-1) if tensor.dim() else tensor.reshape(1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _read_header(path: Path) -> tuple[int, dict]:
    """(header length, tensor entries) of one safetensors file; ValueError naming the file when it
    is not one (too short, an impossible header length, a header that is not JSON)."""
    size = path.stat().st_size
    fix = "download or convert the file again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header); {fix}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise ValueError(
                f"{path}: not a safetensors file or truncated (its header claims {header_len} "
                f"bytes, the file has {size}); {fix}"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    entries = {k: v for k, v in header.items() if k != "__metadata__"} if header else header
    well_formed = isinstance(entries, dict) and all(
        isinstance(v, dict) and {"dtype", "shape", "data_offsets"} <= v.keys()
        for v in entries.values()
    )
    if not well_formed:
        raise ValueError(f"{path}: not a safetensors file (its header is not valid); {fix}")
    return header_len, entries


class SafetensorsReader:
    """All tensors of an HF directory (`*.safetensors`, with or without an index file)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({directory / name for name in weight_map.values()})
            missing = [str(f.name) for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"{index} names shard files that do not exist: {missing}")
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {directory} (only safetensors are read)")
        self.entries: dict[str, TensorEntry] = {}
        self._fds: dict[Path, int] = {}
        for path in files:
            header_len, header = _read_header(path)
            data_bytes = path.stat().st_size - 8 - header_len
            for name, info in header.items():
                if info["dtype"] not in ST_DTYPES:
                    raise ValueError(f"{path.name}: tensor {name} has unsupported {info['dtype']}")
                start, end = info["data_offsets"]
                if end > data_bytes:
                    raise ValueError(
                        f"{path}: truncated: tensor {name} ends at byte {end} of the data "
                        f"section, which holds only {data_bytes} bytes; download the file again"
                    )
                self.entries[name] = TensorEntry(
                    path, ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + header_len + start
                )
            self._fds[path] = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read_rows_into(self, name: str, row0: int, row1: int, out: torch.Tensor) -> torch.Tensor:
        """Rows [row0, row1) of tensor `name` (dim 0; elements for 1-D) into contiguous `out`."""
        entry = self.entries[name]
        row = _row_bytes(entry.shape, entry.dtype)
        total = (row1 - row0) * row
        if (
            not out.is_contiguous()
            or out.dtype != entry.dtype
            or out.numel() * out.itemsize != total
        ):
            raise ValueError(f"read of {name} rows [{row0}, {row1}) into a mismatched buffer")
        view, fd, pos = _as_bytes(out), self._fds[entry.path], 0
        while pos < total:
            n = os.preadv(fd, [view[pos:]], entry.offset + row0 * row + pos)
            if n <= 0:
                raise ValueError(f"{entry.path.name} is truncated (reading {name})")
            pos += n
        return out

    def read_rows(self, name: str, row0: int, row1: int) -> torch.Tensor:
        entry = self.entries[name]
        out = torch.empty((row1 - row0, *entry.shape[1:]), dtype=entry.dtype)
        return self.read_rows_into(name, row0, row1, out)


class ShardWriter:
    """One safetensors file of known tensors [(name, shape, dtype)], filled by pwrite."""

    def __init__(self, path: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.path = path
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.entries: dict[str, TensorEntry] = {}
        self.written: dict[str, int] = {}
        for name, shape, dtype in tensors:
            entry = TensorEntry(path, dtype, tuple(shape), offset)
            header[name] = {
                "dtype": ST_NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            self.entries[name] = entry
            self.written[name] = 0
            offset += entry.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
        self.data_start = 8 + len(blob)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, struct.pack("<Q", len(blob)) + blob, 0)
        os.ftruncate(self.fd, self.data_start + offset)
        self.size = self.data_start + offset

    def _pwrite(self, data: memoryview, position: int) -> None:
        while len(data):
            n = os.pwrite(self.fd, data, position)
            data, position = data[n:], position + n

    def write_block(self, name: str, row0: int, col0: int, block: torch.Tensor) -> None:
        """Write `block` [rows, cols] (or [n] for 1-D) at (row0, col0) of tensor `name`."""
        entry = self.entries[name]
        if block.dtype != entry.dtype:
            block = block.to(entry.dtype)
        block = block.contiguous()
        base = self.data_start + entry.offset
        row = _row_bytes(entry.shape, entry.dtype)
        if len(entry.shape) <= 1 or block.shape[1:] == entry.shape[1:]:
            self._pwrite(_as_bytes(block), base + row0 * row)  # whole rows: one contiguous run
        else:  # a column block (tensor-parallel split on the last axis): one run per row
            col = entry.dtype.itemsize * col0
            for i in range(block.shape[0]):
                self._pwrite(_as_bytes(block[i]), base + (row0 + i) * row + col)
        self.written[name] += block.numel() * block.itemsize

    def close(self) -> None:
        incomplete = {n: (w, self.entries[n].nbytes) for n, w in self.written.items()
                      if w != self.entries[n].nbytes}  # fmt: skip
        os.fsync(self.fd)
        os.close(self.fd)
        if incomplete:
            raise ValueError(
                f"{self.path.name}: tensors not completely written (bytes written, expected): "
                f"{dict(list(incomplete.items())[:10])}; the checkpoint lacks chunks of them"
            )
