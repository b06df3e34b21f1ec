"""Writing a Megatron distributed checkpoint (torch_dist) whose parameters are computed only as they are written.

megatron's own writer resolves every tensor of a rank before writing (and clones those that are views, such as
the gate and up halves of the fused fc1 weight), so a rank holds its whole shard of the model at once. Here the
model's parameters stay unfilled (their storage is allocated but never touched, so it is not resident): each
registered parameter has a function computing its value (e.g. from HF safetensors slices, see
convert/lazy_parameters.py), called when the first write item that views it is written, and its value is
dropped after the last such item. Memory is then one parameter or a few (bounded by ``cache_bytes``) instead
of the whole shard.

The checkpoint is what ``megatron.core.dist_checkpointing.save`` writes: the same planner (MCoreSavePlanner),
the same assignment of items to files (megatron's size-balanced split into ``thread_count`` files per rank),
the same order of items inside each file and the same serialisation (``torch.save`` per item), so every
``__<rank>_<i>.distcp`` file is byte-identical and ``.metadata`` records the same offsets. Only the order in
which the open files of a rank are appended to differs (see :func:`interleaved_write_order`), and the files
are written in the rank's own process instead of forked writer processes.
"""
from __future__ import annotations

import os
from contextlib import ExitStack
from itertools import chain
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.strategies.filesystem_async import (
    FileSystemWriterAsync,
    _item_size,
    _split_by_separation_hint,
    _split_by_size_and_type,
)
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_plan
from torch.distributed.checkpoint.api import _wrap_exception
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, SerializationFormat, _write_item
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType

from megatron_minio3.convert.lazy_parameters import LazyParameters, interleaved_write_order
from megatron_minio3.progress import Progress


def _owned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself if it spans its whole storage, else a copy (torch.save writes the whole storage)."""
    tensor = tensor.detach()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


class StreamingFileSystemWriter(FileSystemWriterAsync):
    """megatron's torch_dist file writer, writing in this process item by item with lazy parameter values.

    Planning (files and their items) is megatron's; :meth:`prepare_write_data` only records the items, and
    the save function resolves, computes, writes and drops them one at a time, appending to the rank's files
    in :func:`interleaved_write_order`. An error is kept and reported through :meth:`retrieve_write_results`
    so that every rank fails in megatron's finalisation instead of waiting at a barrier.
    """

    def __init__(self, path: str | os.PathLike, lazy: LazyParameters, *, thread_count: int,
                 progress_description: str | None = None) -> None:
        super().__init__(path, thread_count=thread_count)
        self.lazy = lazy
        self.progress_description = progress_description
        self._files: list[tuple[str, str, list[WriteItem], list[WriteItem]]] = []
        self._planner: SavePlanner | None = None
        self._results: list | Exception | None = None

    def prepare_write_data(self, plan: SavePlan, planner: SavePlanner) -> None:
        bins = self.thread_count // 2 if self.separation_hint is not None else self.thread_count
        groups = _split_by_separation_hint(_split_by_size_and_type(bins, plan.items), self.separation_hint)
        self._files = []
        for group_name, buckets in groups.items():
            for bucket in buckets:
                if bucket:
                    file_name = f"{group_name}{plan.storage_data.prefix}{len(self._files)}{DEFAULT_SUFFIX}"
                    self._files.append((
                        os.path.join(self.checkpoint_dir, file_name),
                        file_name,
                        [item for item in bucket if item.type == WriteItemType.BYTE_IO],
                        [item for item in bucket if item.type != WriteItemType.BYTE_IO],
                    ))
        self._planner = planner
        self.write_buckets = self._files  # megatron's finalisation checks it was prepared
        self.results_queue = None

    def get_save_function_and_args(self):
        if not self._files:
            self._results = []
            return None, None, []
        return self._write_files, None, []

    def _write_files(self) -> None:
        try:
            self._results = self._write_all()
        except Exception as error:  # reported to every rank by megatron's finalisation
            self._results = error

    def _write_all(self) -> list:
        planner, lazy = self._planner, self.lazy
        transforms = [self.transforms] if hasattr(self, "transforms") else []
        tensor_items = [items for _, _, _, items in self._files]
        views = [[planner.resolve_data(item) for item in items] for items in tensor_items]
        lazy.expect(list(chain.from_iterable(views)))
        owners = [[(lazy.owner(v) if lazy.is_lazy(v) else None, _item_size(item)) for v, item in zip(vs, items)]
                  for vs, items in zip(views, tensor_items)]
        del views  # resolved again item by item below
        total = sum(size for file_owners in owners for _, size in file_owners)
        results: list[list] = [[] for _ in self._files]
        progress = Progress(total, self.progress_description or "", unit="B", scale=1e6, scale_unit="MB",
                            enabled=self.progress_description is not None)
        with ExitStack() as stack, progress:
            streams = [stack.enter_context(open(path, "wb")) for path, _, _, _ in self._files]
            for f, (_, file_name, byte_items, _) in enumerate(self._files):
                for item in byte_items:
                    results[f].append(_write_item(*transforms, streams[f], planner.resolve_data(item), item,
                                                  file_name, serialization_format=SerializationFormat.TORCH_SAVE))
            for f, i in interleaved_write_order(owners):
                item = tensor_items[f][i]
                view = planner.resolve_data(item)
                data = lazy.value_of(view) if lazy.is_lazy(view) else view
                results[f].append(_write_item(*transforms, streams[f], _owned_copy(data), item, self._files[f][1],
                                              serialization_format=SerializationFormat.TORCH_SAVE))
                del data
                lazy.release(view)
                progress.update(owners[f][i][1])
            for stream in streams:
                stream.flush()
                os.fsync(stream.fileno())
        return list(chain.from_iterable(results))

    def retrieve_write_results(self):
        if isinstance(self._results, Exception):
            try:
                raise RuntimeError(f"writing {self.checkpoint_dir} failed: {self._results}") from self._results
            except RuntimeError as error:
                return _wrap_exception(error)
        if self._results is None:
            return _wrap_exception(RuntimeError(f"{self.checkpoint_dir}: nothing was written"))
        return self._results


class StreamingTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist save strategy (same backend name and version, same planning and file layout),
    writing with :class:`StreamingFileSystemWriter`; pass as ``sharded_strategy`` to
    ``dist_checkpointing.save``."""

    def __init__(self, lazy: LazyParameters, progress_description: str | None = None) -> None:
        super().__init__("torch_dist", 1)
        self.lazy = lazy
        self.progress_description = progress_description

    def async_save(self, sharded_state_dict, checkpoint_dir: Path):
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
        writer = StreamingFileSystemWriter(checkpoint_dir, self.lazy, thread_count=self.thread_count,
                                           progress_description=self.progress_description)
        planner = MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False)
        planned = save_state_dict_async_plan(pyt_state_dict, writer, None, 0, planner=planner)
        return self._get_save_and_finalize_callbacks(writer, planned[0])
