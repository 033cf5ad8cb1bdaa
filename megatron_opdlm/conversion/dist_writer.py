"""Write a megatron-core torch_dist checkpoint from lazily computed chunks, one chunk in memory.

megatron-core's own save paths resolve every tensor before writing, so converting a 70B model
would need the whole model in memory. Instead we hand torch.distributed.checkpoint.save a state
dict of storage-less tensors (`LazyTensor`, the same `_Checkpointable` hooks megatron's
checkpointable tensors implement) whose chunks are produced by a function when the writer asks
for them, and a writer that produces -> writes -> drops one chunk at a time (torch's stock
FileSystemWriter keeps the last chunk of every key alive until the file is closed). The files
are the ones `dist_checkpointing.save` writes (`__0_0.distcp`, `.metadata`, `metadata.json`) and
load with `dist_checkpointing.load` at any TP/PP: any non-overlapping chunking is valid.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

ChunkFn = Callable[[], torch.Tensor]
Chunk = tuple[tuple[int, ...], tuple[int, ...], ChunkFn]  # (offsets, sizes, produce)


class LazyTensor(torch.Tensor):
    """A global tensor known only by its shape, dtype and chunks; data made on demand."""

    @staticmethod
    def __new__(cls, global_shape, dtype, chunks):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(global_shape), dtype=dtype)

    def __init__(self, global_shape, dtype, chunks: list[Chunk]):
        self._global_shape = torch.Size(global_shape)
        self._dtype = dtype
        self._chunks = [(torch.Size(o), torch.Size(s), fn) for o, s, fn in chunks]
        self._by_offset = {o: i for i, (o, _, _) in enumerate(self._chunks)}

    def __create_write_items__(self, fqn, obj, index=None):
        props = TensorProperties(dtype=self._dtype)
        return [
            WriteItem(
                index=MetadataIndex(fqn, offsets, i),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                    properties=props,
                    size=self._global_shape,
                ),
            )
            for i, (offsets, sizes, _) in enumerate(self._chunks)
        ]

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(offsets=o, sizes=s) for o, s, _ in self._chunks]

    def __get_tensor_shard__(self, index):
        i = self._by_offset[torch.Size(index.offset)]
        _, sizes, produce = self._chunks[i]
        data = produce()
        if tuple(data.shape) != tuple(sizes) or data.dtype != self._dtype:
            raise RuntimeError(
                f"chunk {index.fqn}@{tuple(index.offset)}: produced {tuple(data.shape)} "
                f"{data.dtype}, expected {tuple(sizes)} {self._dtype}"
            )
        return data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"LazyTensor holds no data ({func})")

    def __repr__(self):
        return f"LazyTensor({tuple(self._global_shape)}, {self._dtype}, {len(self._chunks)} chunks)"


class _StreamingWriter(FileSystemWriter):
    """FileSystemWriter with a write_data that keeps one chunk alive at a time (one file)."""

    def __init__(self, path, on_chunk: Callable[[int], None] | None = None, sync: bool = True):
        super().__init__(path, single_file_per_rank=True, sync_files=sync, thread_count=1)
        self.on_chunk = on_chunk

    def write_data(self, plan, planner):
        from torch.distributed.checkpoint.filesystem import (
            DEFAULT_SUFFIX,
            SerializationFormat,
            _write_item,
        )
        from torch.futures import Future

        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        # objects first (small), then tensors in plan order (layer by layer)
        items = sorted(plan.items, key=lambda w: w.type != WriteItemType.BYTE_IO)
        with open(os.path.join(self.path, name), "wb") as f:
            for item in items:
                data = planner.resolve_data(item)
                if item.type != WriteItemType.BYTE_IO:
                    data = data.detach().contiguous()
                results.append(
                    _write_item(
                        self.transforms, f, data, item, name, SerializationFormat.TORCH_SAVE
                    )
                )
                nbytes = 0 if item.type == WriteItemType.BYTE_IO else data.nbytes
                del data
                if self.on_chunk is not None:
                    self.on_chunk(nbytes)
            f.flush()
            if self.sync_files:
                os.fsync(f.fileno())
        future = Future()
        future.set_result(results)
        return future


class _BytesAsIsPlanner(DefaultSavePlanner):
    """Objects arrive already serialised (as megatron's planner expects them): write verbatim."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def transform_object(self, write_item, object):  # noqa: A002 (torch's signature)
        return object


def sharded_object(value) -> io.BytesIO:
    """A megatron ShardedObject payload: torch.save([value]) in a BytesIO."""
    buffer = io.BytesIO()
    torch.save([value], buffer)
    buffer.seek(0)
    return buffer


def write_torch_dist(
    state: dict, out_dir: str | Path, on_chunk: Callable[[int], None] | None = None
) -> None:
    """Write `state` ({key: LazyTensor | BytesIO}) as a torch_dist checkpoint into `out_dir`.

    The common state megatron stores beside the tensors is `{}`: anything in it would be merged
    into what `dist_checkpointing.load` returns.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = dict(state)
    state["common_state/shard_0_1"] = sharded_object({})
    # torch.save's CRC32 dominates the cost of writing (~370 MiB/s); the loader does not need it.
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        dcp_save(
            state,
            storage_writer=_StreamingWriter(str(out_dir), on_chunk),
            planner=_BytesAsIsPlanner(),
            no_dist=True,
        )
    finally:
        torch.serialization.set_crc32_options(previous)
    # megatron's marker (dist_checkpointing.core.save_config writes the same)
    (out_dir / "metadata.json").write_text(
        json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1})
    )
