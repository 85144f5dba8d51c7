"""How qwen3kd writes Megatron distributed checkpoints: megatron's `torch_dist` format, written
synchronously through torch DCP's own FileSystemWriter, optionally streamed.

Why not megatron's default writer: it keeps a spawned multiprocessing Manager alive for the whole
run and forks writer processes at every save; a rank killed by SIGKILL (OOM killer, preemption)
leaves that Manager behind as an orphan. The files written here are the same format: megatron's
`dist_checkpointing.load` reads them at any layout.

Streaming (`resolve`): tensors in the plan may be placeholders (meta tensors); each is produced
by `resolve(key, global_offset)` only when its bytes are written, and files are closed every
`file_bytes`, so writing holds about one file's tensors plus whatever `resolve` caches.
Reading (`read_regions`): only the requested slices of global tensors, e.g. one layer's.
"""

from __future__ import annotations

import dataclasses
import queue
from collections.abc import Callable
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

Resolve = Callable[[str, tuple[int, ...]], torch.Tensor]
FILE_BYTES = 1 << 30


class _Planner(MCoreSavePlanner):
    def __init__(self, resolve: Resolve | None):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self.resolve = resolve

    def resolve_data(self, item: WriteItem):
        if self.resolve is None or item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(item)
        tensor = self.resolve(item.index.fqn, tuple(item.index.offset))
        want = tuple(item.tensor_data.chunk.sizes)
        if tensor.shape != want and tensor.numel() == _numel(want):
            tensor = tensor.reshape(want)  # stacked layers / experts: chunks carry leading 1-axes
        if tuple(tensor.shape) != want or tensor.dtype != item.tensor_data.properties.dtype:
            raise RuntimeError(f"{item.index.fqn} at {tuple(item.index.offset)}: produced "
                               f"{tuple(tensor.shape)} {tensor.dtype}, planned {want} "
                               f"{item.tensor_data.properties.dtype}")
        return tensor


class _Writer(FileSystemWriter):
    """Items in plan order (optionally re-ordered by `order`), a new file every `file_bytes`."""

    def __init__(self, path: Path, file_bytes: int, order: Callable | None):
        super().__init__(str(path), single_file_per_rank=True, thread_count=1, sync_files=True)
        self.file_bytes, self.order = file_bytes, order

    def write_data(self, plan, planner):
        items = sorted(plan.items, key=self.order) if self.order else list(plan.items)
        buckets, size = [[]], 0
        for item in items:
            n = _nbytes(item)
            if buckets[-1] and size + n > self.file_bytes:
                buckets.append([])
                size = 0
            buckets[-1].append(item)
            size += n
        files: queue.Queue = queue.Queue()
        for i, bucket in enumerate(buckets):
            name = f"{plan.storage_data.prefix}{i}{DEFAULT_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name, bucket))
        return self._write_data(planner, files)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _nbytes(item: WriteItem) -> int:
    if item.type == WriteItemType.BYTE_IO:
        return 0
    return _numel(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


class SyncSave(SaveShardedStrategy):
    def __init__(self, resolve: Resolve | None = None, order: Callable | None = None,
                 file_bytes: int = FILE_BYTES):
        super().__init__("torch_dist", 1)
        self.resolve, self.order, self.file_bytes = resolve, order, file_bytes

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        dcp_save(mcore_to_pyt_state_dict(state, False),
                 storage_writer=_Writer(Path(checkpoint_dir), self.file_bytes, self.order),
                 planner=_Planner(self.resolve))


class _RegionPlanner(LoadPlanner):
    """Reads given regions of global tensors (any chunking on disk) into given tensors."""

    def __init__(self, targets: list[tuple[str, tuple[int, ...], torch.Tensor]]):
        self.targets = targets

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for i, (key, offset, dest) in enumerate(self.targets):
            md = self.metadata.state_dict_metadata.get(key)
            if md is None:
                raise KeyError(f"tensor '{key}' is not in the checkpoint")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=dest.shape)
            for item in create_read_items_for_chunk_list(key, md, [chunk]):
                items.append(dataclasses.replace(
                    item, dest_index=MetadataIndex(key, item.dest_index.offset, i)))
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("only tensors are read")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        t = self.targets[read_item.dest_index.index][2]
        for dim, (o, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            t = t.narrow(dim, o, n)
        return t

    def commit_tensor(self, read_item, tensor) -> None:
        pass


def read_regions(path: Path, sharded_tensors: list) -> None:
    """Fill each megatron ShardedTensor's `data` with its region of the checkpoint at `path`,
    reading only those bytes (megatron's own loader assumes every rank of a regular grid is
    present, which a one-process partial read is not)."""
    targets = []
    for sh in sharded_tensors:
        dest = torch.empty((1,) * sh.prepend_axis_num + tuple(sh.local_shape), dtype=sh.data.dtype)
        targets.append((sh.key, tuple(sh.global_offset), dest))
    dcp_load({}, storage_reader=FileSystemReader(str(path)), planner=_RegionPlanner(targets),
             no_dist=True)
    for sh, (_, _, dest) in zip(sharded_tensors, targets, strict=True):
        sh.data.copy_(dest.view(sh.data.shape))
