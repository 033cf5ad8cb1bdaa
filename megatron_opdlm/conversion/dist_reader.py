"""Read a torch_dist checkpoint chunk by chunk, one process, without building a model.

The `.metadata` file lists every tensor's global shape and stored chunks (offsets, sizes, file,
byte range); each chunk is one torch.save record inside a `.distcp` file. Reading one record at a
time bounds memory by the largest stored chunk (the converter writes <= 128 MiB chunks; a model
saved by training stores one chunk per layer and tensor-parallel rank).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata


class _FileWindow(io.RawIOBase):
    """Read-only view of bytes [start, start + length) of a file (torch.load reads from it)."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, min(self.length, base + offset))
        return self.pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.length - self.pos)
        if n <= 0:
            return 0
        got = os.preadv(self.fd, [memoryview(buffer)[:n]], self.start + self.pos)
        self.pos += got
        return got


class DistCheckpointReader:
    """Tensors of a torch_dist checkpoint directory: shapes, dtypes and their stored chunks."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        if not (self.directory / ".metadata").is_file():
            raise ValueError(f"{self.directory} is not a torch_dist checkpoint (no .metadata)")
        self.metadata = FileSystemReader(str(self.directory)).read_metadata()
        self.tensors: dict[str, TensorStorageMetadata] = {
            key: value
            for key, value in self.metadata.state_dict_metadata.items()
            if isinstance(value, TensorStorageMetadata)
        }
        self._fds: dict[str, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def _load(self, key: str, chunk) -> torch.Tensor:
        info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
        if getattr(info, "transform_descriptors", None):
            raise ValueError(
                f"{key}: stored with transforms {info.transform_descriptors} "
                "(compressed checkpoints are not supported)"
            )
        fd = self._fds.get(info.relative_path)
        if fd is None:
            path = self.directory / info.relative_path
            fd = self._fds[info.relative_path] = os.open(path, os.O_RDONLY)
        window = io.BufferedReader(_FileWindow(fd, info.offset, info.length), 1 << 20)
        data = torch.load(window, map_location="cpu", weights_only=True)
        if tuple(data.shape) != tuple(chunk.sizes):
            raise ValueError(f"{key}: chunk at {tuple(chunk.offsets)} has a corrupt record")
        return data

    def chunks(
        self, key: str, prefetch: bool = False
    ) -> Iterator[tuple[tuple[int, ...], torch.Tensor]]:
        """(offsets, data) of each stored chunk of `key`, in offset order. With `prefetch` the
        next chunk is read while the caller writes the current one (two chunks in memory)."""
        stored = sorted(self.tensors[key].chunks, key=lambda c: tuple(c.offsets))
        if not prefetch:
            for chunk in stored:
                yield tuple(chunk.offsets), self._load(key, chunk)
            return
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(self._load, key, stored[0]) if stored else None
            for i, chunk in enumerate(stored):
                data = pending.result()
                pending = (
                    pool.submit(self._load, key, stored[i + 1]) if i + 1 < len(stored) else None
                )
                yield tuple(chunk.offsets), data
                del data
