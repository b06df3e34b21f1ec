"""Push the exporter's buckets into rollout engines, one bucket at a time.

    sync_weights(exporter, targets)   called by every actor rank together (the export is collective);
                                      ranks without a target pass [] and only take part in the export.
Targets:
    InProcessTarget(engine)           the engine runs in this process (CPU; GPU with the verl-style colocation):
                                      each bucket goes straight to engine.update_weights.
    CudaIpcTarget(send)               the engine is another process on the same GPU: each bucket travels as a
                                      CUDA IPC handle; the engine process calls load_ipc_bucket(engine, payload).
                                      Written for GPUs, untested here (no GPU in CI); see docs/weights.md.
    BroadcastTarget(group)            engines in other processes (other GPUs or hosts): each bucket is broadcast
                                      over a dedicated WeightGroup (gloo on CPU, NCCL on GPU) from the trainer's
                                      sending rank; each engine process calls receive_weights(engine, group).
Every bucket is one engine.update_weights call, which reloads it in place and then resets the engine's
prefix, multimodal and encoder caches, so no KV or image embedding computed with old weights survives.

Engine side: only this module and weights/bucket.py are imported (no Megatron).
"""
from __future__ import annotations

import datetime
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from megatron_minio3.weights.bucket import Bucket, TensorEntry, bucket_views


class WeightEngine(Protocol):
    """What a rollout engine offers the sync (rollout.engine.VllmEngine)."""

    cfg: Any  # RolloutConfig: weight_bucket_mb

    def update_weights(self, named_tensors) -> int: ...


def engine_bucket_bytes(engine: WeightEngine) -> int:
    return engine.cfg.weight_bucket_mb << 20


def check_bucket_stays_whole(entries: Sequence[TensorEntry], element_size: int, engine_bucket_bytes: int) -> None:
    """ValueError unless engine.update_weights loads this bucket in one vLLM reload call.

    VllmEngine.update_weights hands tensors to vLLM in reload calls of `rollout.weight_bucket_mb`, cutting
    after the tensor that reaches that size; a cut inside a bucket could split a fused module (whose other
    tensors vLLM would then leave uninitialised). So everything before a bucket's last tensor must stay below it.
    """
    before_last = sum(entry.numel for entry in entries[:-1]) * element_size
    if before_last >= engine_bucket_bytes:
        raise ValueError(
            f"weight bucket starting at '{entries[0].name}' ({before_last} bytes before its last tensor) would be "
            f"split by the engine's reload size ({engine_bucket_bytes} bytes, rollout.weight_bucket_mb): lower "
            "weights.bucket_mb below rollout.weight_bucket_mb"
        )


class WeightTarget(Protocol):
    def begin(self, plan: Sequence[Sequence[TensorEntry]], dtype: torch.dtype) -> None:
        """Called once before the first bucket, with every bucket's entries."""

    def push(self, bucket: Bucket) -> None:
        """Must return only when the bucket's memory may be reused (the next bucket overwrites the buffer; a
        view bucket's tensors are the live parameters)."""


@dataclass(frozen=True)
class SyncStats:
    num_buckets: int
    num_tensors: int
    num_bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def metrics(self, prefix: str = "weights/") -> dict[str, float]:
        return {
            f"{prefix}sync_s": self.seconds,
            f"{prefix}sync_gb": self.num_bytes / 1e9,
            f"{prefix}sync_gb_per_s": self.gb_per_s,
            f"{prefix}num_buckets": float(self.num_buckets),
        }


def sync_weights(exporter, targets: Sequence[WeightTarget]) -> SyncStats:
    """Export every bucket (collective over the actor's ranks) and push each into this rank's targets."""
    started = time.perf_counter()
    plans = exporter.plan()
    for target in targets:
        target.begin([plan.entries for plan in plans], exporter.dtype)
    num_tensors = num_bytes = 0
    # Engines in this process load views of the parameters (no bucket copy); anything else needs flat buffers.
    views = bool(targets) and all(getattr(target, "accepts_views", False) for target in targets)
    for bucket in exporter.buckets(views=views):
        for target in targets:
            target.push(bucket)
        num_tensors += len(bucket.entries)
        num_bytes += bucket.num_bytes
        del bucket  # before the next one is gathered
    return SyncStats(len(plans), num_tensors, num_bytes, time.perf_counter() - started)


class InProcessTarget:
    """An engine living in this process: buckets are loaded directly, no copy. It takes view buckets
    (WeightExporter.buckets(views=True)): the engine copies what it loads before push returns."""

    accepts_views = True

    def __init__(self, engine: WeightEngine):
        self.engine = engine

    def begin(self, plan: Sequence[Sequence[TensorEntry]], dtype: torch.dtype) -> None:
        element_size = torch.empty((), dtype=dtype).element_size()
        for entries in plan:
            check_bucket_stays_whole(entries, element_size, engine_bucket_bytes(self.engine))

    def push(self, bucket: Bucket) -> None:
        self.engine.update_weights(bucket.named_tensors())


# ------------------------------------------------------------------------------- CUDA IPC (colocated GPU)


@dataclass(frozen=True)
class IpcBucket:
    """A bucket on a GPU, as a CUDA IPC handle another process on the same GPU can open."""

    handle: tuple  # torch.multiprocessing.reductions.reduce_tensor(flat): (rebuild function, its arguments)
    entries: tuple[TensorEntry, ...]
    device_uuid: str  # the physical GPU (device indices differ between processes)


class CudaIpcTarget:
    """An engine in another process on this rank's GPU. `send(payload)` must deliver the IpcBucket to that
    process, have it call load_ipc_bucket(engine, payload), and return when that call has returned (e.g.
    ``lambda p: ray.get(rollout_worker.load_ipc_bucket.remote(p))``): the bucket is freed after `push`."""

    def __init__(self, send: Callable[[IpcBucket], Any]):
        self.send = send

    def begin(self, plan: Sequence[Sequence[TensorEntry]], dtype: torch.dtype) -> None:
        """Nothing to announce: each payload is self-describing."""

    def push(self, bucket: Bucket) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        if not bucket.flat.is_cuda:
            raise ValueError(
                f"CUDA IPC weight sync needs CUDA tensors; bucket starting at '{bucket.entries[0].name}' is on "
                f"{bucket.flat.device} (use InProcessTarget or BroadcastTarget there)"
            )
        torch.cuda.current_stream(bucket.flat.device).synchronize()  # written before the engine reads it
        uuid = str(torch.cuda.get_device_properties(bucket.flat.device).uuid)
        self.send(IpcBucket(reduce_tensor(bucket.flat), bucket.entries, uuid))


def load_ipc_bucket(engine: WeightEngine, payload: IpcBucket) -> int:
    """Engine process: open the bucket's memory through its IPC handle and load it; returns the tensor count."""
    rebuild, args = payload.handle
    local = [
        i for i in range(torch.cuda.device_count()) if str(torch.cuda.get_device_properties(i).uuid) == payload.device_uuid
    ]
    if not local:
        raise ValueError(
            f"weight bucket '{payload.entries[0].name}' lives on GPU {payload.device_uuid}, not visible here"
        )
    args = list(args)
    args[6] = local[0]  # rebuild_cuda_tensor's storage_device: this process's index of that GPU
    flat = rebuild(*args)
    check_bucket_stays_whole(payload.entries, flat.element_size(), engine_bucket_bytes(engine))
    loaded = engine.update_weights(bucket_views(flat, payload.entries))
    torch.cuda.current_stream(flat.device).synchronize()  # done reading before the trainer frees it
    return loaded


# ------------------------------------------------------------------------------- broadcast (separate engines)


class WeightGroup:
    """A process group of its own for weight broadcasts: rank 0 is the sending trainer rank (it hosts the
    rendezvous store at host:port), ranks 1..world_size-1 are engine processes. Independent of the
    trainer's and the engines' own torch.distributed worlds."""

    def __init__(
        self, host: str, port: int, rank: int, world_size: int, *, backend: str = "gloo", timeout_s: float = 600
    ):
        if world_size < 2 or not 0 <= rank < world_size:
            raise ValueError(f"weight group needs world_size >= 2 and 0 <= rank < world_size, got {rank}/{world_size}")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight group backend must be 'gloo' or 'nccl', got {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        store = dist.PrefixStore("minio3_weights", store)
        if backend == "gloo":
            self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
            self.device = torch.device("cpu")
        else:
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(store, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank = rank
        self.world_size = world_size

    def broadcast(self, tensor: torch.Tensor) -> None:
        """From rank 0 into `tensor` on every other rank."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's picklable object, on every rank (trusted peers only: it is unpickled)."""
        payload = pickle.dumps(obj) if self.rank == 0 else b""
        length = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        self.broadcast(length)
        data = torch.empty(int(length), dtype=torch.uint8, device=self.device)
        if self.rank == 0:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        self.broadcast(data)
        return pickle.loads(data.cpu().numpy().tobytes())

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when `ok` is True on every rank (lets engines reject a sync before it starts)."""
        flag = torch.tensor([int(ok)], dtype=torch.int64, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.group.allreduce([flag], options).wait()
        return bool(flag.item())


@dataclass(frozen=True)
class _BroadcastHeader:
    dtype: torch.dtype
    buckets: tuple[tuple[TensorEntry, ...], ...]


class BroadcastTarget:
    """Rank 0 of a WeightGroup: announces the bucket layout, then broadcasts each bucket's buffer."""

    def __init__(self, group: WeightGroup):
        if group.rank != 0:
            raise ValueError(f"BroadcastTarget must be rank 0 of its weight group, not rank {group.rank}")
        self.group = group

    def begin(self, plan: Sequence[Sequence[TensorEntry]], dtype: torch.dtype) -> None:
        self.group.broadcast_object(_BroadcastHeader(dtype, tuple(tuple(entries) for entries in plan)))
        if not self.group.all_ok(True):
            raise ValueError("an engine of the weight group rejected the bucket layout (see its error)")

    def push(self, bucket: Bucket) -> None:
        if bucket.flat.device != self.group.device:
            raise ValueError(
                f"bucket starting at '{bucket.entries[0].name}' is on {bucket.flat.device}, the weight group "
                f"sends from {self.group.device}"
            )
        self.group.broadcast(bucket.flat)


def receive_buckets(group: WeightGroup, engine_bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Engine process (rank >= 1 of the group): the buckets of one sync, each a fresh buffer, as they arrive.

    Every engine first checks the announced layout against its reload size; if any engine rejects it, every
    rank raises ValueError before a bucket is sent. Iterate to the end: each bucket is a collective.
    """
    if group.rank == 0:
        raise ValueError("weights are received on the engine ranks (>= 1) of the weight group, not on rank 0")
    header: _BroadcastHeader = group.broadcast_object()
    element_size = torch.empty((), dtype=header.dtype).element_size()
    try:
        for entries in header.buckets:
            check_bucket_stays_whole(entries, element_size, engine_bucket_bytes)
    except ValueError:
        group.all_ok(False)
        raise
    if not group.all_ok(True):
        raise ValueError("another engine of the weight group rejected the bucket layout (see its error)")
    for entries in header.buckets:
        flat = torch.empty(sum(e.numel for e in entries), dtype=header.dtype, device=group.device)
        group.broadcast(flat)
        yield bucket_views(flat, entries)
        del flat


def receive_weights(engine: WeightEngine, group: WeightGroup) -> SyncStats:
    """Engine process: receive one sync into `engine`, loading each bucket as it arrives."""
    started = time.perf_counter()
    num_buckets = num_tensors = num_bytes = 0
    for named_tensors in receive_buckets(group, engine_bucket_bytes(engine)):
        num_tensors += engine.update_weights(named_tensors)
        num_bytes += sum(tensor.numel() * tensor.element_size() for _, tensor in named_tensors)
        num_buckets += 1
        del named_tensors
    return SyncStats(num_buckets, num_tensors, num_bytes, time.perf_counter() - started)
