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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class _StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    file_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the first element in the file
    num_bytes: int


def read_safetensors_header(path: str | os.PathLike) -> dict[str, _StoredTensor]:
    """Tensor locations of one safetensors file, in file order; ValueError naming the file (and tensor) when
    the header is malformed or a tensor's byte range does not match its shape and dtype or lies outside the file.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets: [a, b]}},
    then the data; tensor bytes are [8 + N + a, 8 + N + b).
    """
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > file_size - 8:
            raise ValueError(f"{path}: header length {header_len} exceeds the file size {file_size}")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    data_start = 8 + header_len
    entries: dict[str, _StoredTensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            first, last = (int(x) for x in info["data_offsets"])
        except KeyError as e:
            raise ValueError(f"{path}: tensor '{name}' has an unsupported dtype or lacks {e}") from None
        except (TypeError, ValueError):
            raise ValueError(f"{path}: tensor '{name}' has a malformed header entry {info}") from None
        expected = math.prod(shape) * dtype.itemsize
        if last - first != expected or first < 0 or data_start + last > file_size:
            raise ValueError(
                f"{path}: tensor '{name}' ({info['dtype']} {list(shape)}, {expected} bytes) has data_offsets "
                f"[{first}, {last}] that do not fit it or the file ({file_size - data_start} data bytes)"
            )
        entries[name] = _StoredTensor(path.name, dtype, shape, data_start + first, expected)
    return entries


class SafetensorsReader:
    """All tensors of a HF checkpoint directory (single file or sharded with an index), read on demand.

    Tensors are read with positioned reads (``os.preadv``) into fresh tensors, never memory-mapped: a process
    holds only what it keeps (no file-backed pages of the checkpoint accumulate in its resident memory), and a
    slice along dimension d of a tensor of shape S reads prod(S[:d]) byte runs of (stop - start) * prod(S[d+1:])
    elements each, so only the requested bytes are read.
    """

    def __init__(self, hf_dir: str | os.PathLike) -> None:
        self.hf_dir = Path(hf_dir)
        self._fds: dict[str, int] = {}
        index_path = self.hf_dir / INDEX_NAME
        if index_path.is_file():
            with open(index_path) as f:
                self.weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif (self.hf_dir / SINGLE_NAME).is_file():
            self.weight_map = {name: SINGLE_NAME for name in sorted(self._header(SINGLE_NAME))}
        else:
            raise ValueError(f"{self.hf_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self._entries: dict[str, _StoredTensor] = {}
        headers: dict[str, dict[str, _StoredTensor]] = {}
        for name, file_name in self.weight_map.items():
            if file_name not in headers:
                headers[file_name] = self._header(file_name)
            if name not in headers[file_name]:
                raise ValueError(f"{self.hf_dir / file_name}: has no tensor '{name}' (listed there in {INDEX_NAME})")
            self._entries[name] = headers[file_name][name]

    def _header(self, file_name: str) -> dict[str, _StoredTensor]:
        path = self.hf_dir / file_name
        if not path.is_file():
            raise ValueError(f"{path}: listed in {INDEX_NAME} but missing")
        return read_safetensors_header(path)

    def _fd(self, file_name: str) -> int:
        if file_name not in self._fds:
            self._fds[file_name] = os.open(self.hf_dir / file_name, os.O_RDONLY)
        return self._fds[file_name]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: entry.shape for name, entry in self._entries.items()}

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def _entry(self, name: str) -> _StoredTensor:
        if name not in self._entries:
            raise ValueError(f"{self.hf_dir}: no tensor '{name}'")
        return self._entries[name]

    def read(self, name: str) -> torch.Tensor:
        entry = self._entry(name)
        data = self._read_runs(name, entry.begin, entry.num_bytes, num_runs=1, stride=entry.num_bytes)
        return data.view(entry.dtype).reshape(entry.shape)

    def read_chunk(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """Rows/columns [start, stop) of ``name`` along ``dim`` (the whole tensor when dim is None);
        only those bytes are read from disk."""
        if dim is None:
            return self.read(name)
        entry = self._entry(name)
        shape = entry.shape
        if not 0 <= dim < len(shape) or not 0 <= start <= stop <= shape[dim]:
            raise ValueError(f"tensor '{name}' of shape {list(shape)}: cannot read [{start}, {stop}) of dim {dim}")
        inner_bytes = math.prod(shape[dim + 1 :]) * entry.dtype.itemsize
        data = self._read_runs(
            name,
            entry.begin + start * inner_bytes,
            run_bytes=(stop - start) * inner_bytes,
            num_runs=math.prod(shape[:dim]),
            stride=shape[dim] * inner_bytes,
        )
        return data.view(entry.dtype).reshape(*shape[:dim], stop - start, *shape[dim + 1 :])

    def _read_runs(self, name: str, first: int, run_bytes: int, num_runs: int, stride: int) -> torch.Tensor:
        """num_runs runs of run_bytes bytes, the i-th at byte first + i * stride of name's file, as uint8."""
        entry = self._entries[name]
        out = torch.empty(num_runs * run_bytes, dtype=torch.uint8)
        view = memoryview(out.numpy())
        fd, where = self._fd(entry.file_name), f"{self.hf_dir / entry.file_name}: tensor '{name}'"
        if num_runs == 1 or run_bytes == stride:  # adjacent runs: one read
            _pread_exact(fd, view, first, where)
        else:
            for i in range(num_runs):
                _pread_exact(fd, view[i * run_bytes : (i + 1) * run_bytes], first + i * stride, where)
        return out


def _pread_exact(fd: int, view: memoryview, offset: int, where: str) -> None:
    """Fills view from the file at offset (positioned reads, retried until complete)."""
    done = 0
    while done < len(view):
        num_read = os.preadv(fd, [view[done:]], offset + done)
        if num_read == 0:
            raise ValueError(f"{where}: file ends before the tensor's data (truncated?)")
        done += num_read


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
