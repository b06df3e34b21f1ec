"""Streaming safetensors I/O: read tensors or slices lazily; write size-capped shards tensor by tensor.

Also :func:`atomic_directory`: output is built in a hidden temporary sibling and renamed into place only
when complete, so an interrupted conversion never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class SafetensorsReader:
    """All tensors of a HF checkpoint directory (single file or sharded with an index), read on demand."""

    def __init__(self, hf_dir: str | os.PathLike) -> None:
        self.hf_dir = Path(hf_dir)
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        index_path = self.hf_dir / INDEX_NAME
        if index_path.is_file():
            with open(index_path) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif (self.hf_dir / SINGLE_NAME).is_file():
            self.weight_map = {name: SINGLE_NAME for name in self._handle(SINGLE_NAME).keys()}
        else:
            raise ValueError(f"{self.hf_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for name, file_name in self.weight_map.items():
            tensor_slice = self._handle(file_name).get_slice(name)
            self._shapes[name] = tuple(tensor_slice.get_shape())
            self._dtypes[name] = _DTYPES[tensor_slice.get_dtype()]

    def _handle(self, file_name: str):
        if file_name not in self._handles:
            path = self.hf_dir / file_name
            if not path.is_file():
                raise ValueError(f"{path}: listed in {INDEX_NAME} but missing")
            self._handles[file_name] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[file_name]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def read(self, name: str) -> torch.Tensor:
        return self._handle(self.weight_map[name]).get_tensor(name)

    def read_chunk(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """Rows/columns [start, stop) of ``name`` along ``dim`` (the whole tensor when dim is None);
        only those bytes are read from disk."""
        if dim is None:
            return self.read(name)
        tensor_slice = self._handle(self.weight_map[name]).get_slice(name)
        index = tuple(slice(None) for _ in range(dim)) + (slice(start, stop),)
        return tensor_slice[index]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class StreamingSafetensorsWriter:
    """Writes tensors straight to disk in a planned order, so memory never holds more than one tensor.

    The shard plan (HF-style ``model-0000i-of-0000n.safetensors`` of at most ``max_shard_bytes`` each, or a
    single ``model.safetensors``) and every file header are fixed up front from the specs; ``write`` must
    then be called once per spec, in order.
    """

    def __init__(self, out_dir: str | os.PathLike, specs: list[TensorSpec], max_shard_bytes: int) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate tensor names: {sorted(n for n in set(names) if names.count(n) > 1)}")
        self.out_dir = Path(out_dir)
        shards: list[list[TensorSpec]] = [[]]
        shard_bytes = 0
        for spec in specs:
            if shards[-1] and shard_bytes + spec.num_bytes > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append(spec)
            shard_bytes += spec.num_bytes
        self._shards = shards
        self._file_names = (
            [SINGLE_NAME]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        self._queue = [(i, spec) for i, shard in enumerate(shards) for spec in shard]
        self._next = 0
        self._file = None
        self.total_bytes = sum(s.num_bytes for s in specs)

    def _open_shard(self, index: int) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self._shards[index]:
            header[spec.name] = {
                "dtype": _DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.num_bytes],
            }
            offset += spec.num_bytes
        header_bytes = json.dumps(header, separators=(",", ":")).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)
        self._file = open(self.out_dir / self._file_names[index], "wb")
        self._file.write(struct.pack("<Q", len(header_bytes)))
        self._file.write(header_bytes)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"tensor '{name}' is not in the plan (all planned tensors are written)")
        shard_index, spec = self._queue[self._next]
        if name != spec.name:
            raise ValueError(f"tensor '{name}' written out of order: expected '{spec.name}' next")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor '{name}' is {tuple(tensor.shape)} {tensor.dtype}, planned {spec.shape} {spec.dtype}"
            )
        if self._file is None:
            self._open_shard(shard_index)
        self._file.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard_index:
            self._file.close()
            self._file = None

    def close(self) -> list[str]:
        """Checks that every planned tensor was written; writes the index for sharded output."""
        if self._next != len(self._queue):
            missing = [spec.name for _, spec in self._queue[self._next :]]
            raise ValueError(f"{len(missing)} planned tensor(s) never written, first: {missing[:4]}")
        if len(self._shards) > 1:
            weight_map = {
                spec.name: file_name for file_name, shard in zip(self._file_names, self._shards) for spec in shard
            }
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return list(self._file_names)


@contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of out_dir; renames it to out_dir when the block succeeds."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp_dir
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
