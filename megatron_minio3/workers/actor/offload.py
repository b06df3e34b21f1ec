"""Park a Megatron rank's state (params, grads, optimizer state) in host memory between phases, bit-identically.

In colocated RL the vLLM engines share the GPU with the Megatron actor: during rollout the actor's params,
grads and optimizer state leave the GPU and come back for the update. What moves is a tensor's *storage*,
not the tensor: each distinct storage is copied into a host buffer and the device storage is freed with
``untyped_storage().resize_(0)``; reload resizes it back and copies the bytes in. Every tensor object (a
``Parameter``, a view into megatron DDP's contiguous param/grad buffers, an Adam moment) keeps its identity,
shape, strides and offset, so views stay valid views and nothing that holds a reference (DDP hooks, the
optimizer's param groups, ``param.main_grad``) has to be re-pointed.

* GPU: host buffers are pinned (``pin_memory=True``) and copies are ``non_blocking``, one synchronize per
  bucket; after an offload the caching allocator's freed blocks are returned (``torch.cuda.empty_cache``) so
  another allocator (vLLM's) can use them. torch's pinned-memory allocator may round each host buffer up to a
  power of two. Anything that captured device addresses (CUDA graphs, NCCL user-buffer registration) is
  invalid after a round trip: the storages come back at new addresses.
* CPU (tests, demo): the same code moves CPU storages host-to-host: each is copied into its separate host
  buffer and the original freed, so the round trip and its memory accounting are exercised without a GPU.

Storages are grouped into buckets of about ``bucket_bytes`` (a larger storage is a bucket of its own); a
bucket's copies complete before its storages are freed (offload) or before the next bucket starts (reload),
so the work in flight stays bounded. Host buffers are allocated once, keyed by storage identity and size, and
reused by later round trips; ``release_host_buffers`` gives them back.

The tensor list is rebuilt at every ``offload`` (a callable collects it), because Adam's state appears
lazily at the first optimizer step. ``offload`` when already offloaded and ``reload`` when not offloaded are
no-ops (they return empty stats), so phases can call them unconditionally. Storages that are already empty
(zero bytes: empty tensors, or freed by another offloader) are skipped; tensors on another device type than
the offloader's are skipped too (Adam's ``step`` counter lives on the CPU even when training on the GPU).

:class:`ActorStateOffloader` collects the three switchable groups of a megatron DDP model and its optimizer
(params / grads / optimizer) so a trainer can move grads and optimizer state first and params later.
Peak resident / device memory per phase is measured by :mod:`megatron_minio3.workers.memory`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 256 << 20
GROUPS = ("params", "grads", "optimizer")


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of a tensor's storage: the address of its StorageImpl.

    Stable while the storage is resized to 0 and back (its data pointer is not: it is 0 while offloaded and
    a fresh allocation after), and shared by every view of the storage.
    """
    return tensor.untyped_storage()._cdata


def default_device_type() -> str:
    """The device type whose storages an offloader moves by default: ``cuda`` when present, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class OffloadStats:
    """What one ``offload``/``reload`` call moved."""

    num_storages: int = 0
    num_bytes: int = 0
    num_buckets: int = 0
    seconds: float = 0.0

    @property
    def gib_per_second(self) -> float:
        return self.num_bytes / 2**30 / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Parked:
    """One storage while offloaded: the storage itself (kept alive), its size, its host copy."""

    storage: torch.UntypedStorage
    num_bytes: int
    host: torch.Tensor  # uint8, num_bytes long


def unique_storages(tensors: Iterable[torch.Tensor], device_type: str) -> list[tuple[int, torch.UntypedStorage]]:
    """``(key, storage)`` of each distinct non-empty storage on ``device_type``, in first-seen order."""
    seen: dict[int, torch.UntypedStorage] = {}
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"expected tensors to offload, got {type(tensor).__name__}")
        if tensor.device.type != device_type:
            continue
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in seen and storage.nbytes() > 0:
            seen[key] = storage
    return list(seen.items())


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``sizes`` in order, grouped into consecutive buckets of at most ``bucket_bytes`` each
    (an item larger than that is a bucket of its own)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for index, size in enumerate(sizes):
        if current and current_bytes + size > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += size
    if current:
        buckets.append(current)
    return buckets


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole of ``storage`` (same memory)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class HostOffloader:
    """Moves the storages of the tensors that ``collect()`` returns to host memory and back.

    ``collect`` is called at every ``offload`` (so tensors created since the last one are included); a plain
    iterable of tensors is accepted too (it is then fixed). Tensors whose storage is already empty are
    skipped, as are tensors on another device type than ``device_type`` (default: cuda when available).
    ``empty_cache``: on CUDA, return the freed blocks to the driver after each offload.
    """

    def __init__(
        self,
        collect: Callable[[], Iterable[torch.Tensor]] | Iterable[torch.Tensor],
        *,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        device_type: str | None = None,
        empty_cache: bool = True,
    ):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        if callable(collect):
            self._collect = collect
        else:
            fixed = list(collect)
            self._collect = lambda: fixed
        self.bucket_bytes = bucket_bytes
        self.device_type = device_type or default_device_type()
        self._pin = self.device_type == "cuda"
        self.empty_cache = empty_cache
        self._host: dict[tuple[int, int], torch.Tensor] = {}  # (storage key, bytes) -> host buffer
        self._parked: list[_Parked] | None = None  # set while offloaded

    @property
    def offloaded(self) -> bool:
        return self._parked is not None

    @property
    def host_bytes(self) -> int:
        """Bytes of host buffers this offloader holds (kept between round trips)."""
        return sum(buffer.numel() for buffer in self._host.values())

    def offload(self) -> OffloadStats:
        """Copies every collected storage to its host buffer and frees it on the device. No-op when offloaded."""
        if self.offloaded:
            return OffloadStats()
        start = time.perf_counter()
        storages = unique_storages(self._collect(), self.device_type)
        for _, storage in storages:
            if not storage.resizable():
                raise ValueError(
                    f"a {storage.nbytes()}-byte storage on {storage.device} is not resizable (memory-mapped or "
                    "borrowed from another library?): it cannot be freed in place; copy it into a torch tensor"
                )
        # host buffers of storages that no longer exist (or changed size) are dropped, the others reused
        wanted = {(key, storage.nbytes()) for key, storage in storages}
        self._host = {k: v for k, v in self._host.items() if k in wanted}
        sizes = [storage.nbytes() for _, storage in storages]
        buckets = plan_buckets(sizes, self.bucket_bytes)
        parked: list[_Parked] = []
        try:
            for bucket in buckets:
                items = []
                for index in bucket:
                    key, storage = storages[index]
                    host = self._host.get((key, sizes[index]))
                    if host is None:
                        host = torch.empty(sizes[index], dtype=torch.uint8, pin_memory=self._pin)
                        self._host[(key, sizes[index])] = host
                    host.copy_(_as_bytes(storage), non_blocking=self._pin)
                    items.append(_Parked(storage, sizes[index], host))
                self._synchronize()  # the host copies are complete before the device memory goes
                for item in items:
                    item.storage.resize_(0)
                parked.extend(items)
        except BaseException:
            if parked:  # say, no host memory for a later bucket: what was freed stays reloadable
                self._parked = parked
            raise
        self._parked = parked
        if self.device_type == "cuda" and self.empty_cache and parked:
            torch.cuda.empty_cache()  # give the freed blocks back to the driver, for the rollout engine
        return OffloadStats(len(parked), sum(sizes), len(buckets), time.perf_counter() - start)

    def reload(self) -> OffloadStats:
        """Re-allocates every offloaded storage and copies its bytes back. No-op when not offloaded.

        If it fails part-way (the device out of memory, say), the storages not yet back stay offloaded and a
        later ``reload()`` finishes the job."""
        if self._parked is None:
            return OffloadStats()
        start = time.perf_counter()
        parked = self._parked
        buckets = plan_buckets([item.num_bytes for item in parked], self.bucket_bytes)
        for bucket in buckets:
            try:
                for index in bucket:
                    item = parked[index]
                    if item.storage.nbytes() != item.num_bytes:  # already back after an interrupted reload
                        assert item.storage.nbytes() == 0, "an offloaded storage was resized behind our back"
                        item.storage.resize_(item.num_bytes)
                    _as_bytes(item.storage).copy_(item.host, non_blocking=self._pin)
                self._synchronize()
            except BaseException:
                # say, the device is out of memory: this bucket and the rest stay parked; reload() again later
                self._parked = parked[bucket[0]:]
                raise
        self._parked = None
        num_bytes = sum(item.num_bytes for item in parked)
        return OffloadStats(len(parked), num_bytes, len(buckets), time.perf_counter() - start)

    def release_host_buffers(self) -> int:
        """Frees the host buffers kept for reuse (not while offloaded: they hold the state). Returns their bytes."""
        if self.offloaded:
            raise ValueError("cannot release host buffers while offloaded: they hold the only copy of the state")
        freed = self.host_bytes
        self._host = {}
        return freed

    def _synchronize(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------
# What to move from a megatron DDP model and its optimizer
# ---------------------------------------------------------------------------------------------------------


def _ddp_buffers(ddp_model) -> list:
    """megatron DDP's contiguous param/grad buffers (dense and expert-parallel); [] for a plain module.

    megatron's DDP stores them in a list attribute ``buffers`` that shadows ``nn.Module.buffers()``.
    """
    buffers = getattr(ddp_model, "buffers", None)
    if callable(buffers):  # a plain nn.Module: that is its registered-buffers method
        return []
    return list(buffers or []) + list(getattr(ddp_model, "expert_parallel_buffers", None) or [])


def _inner_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module megatron's DDP wraps (whose ``buffers()`` still works); any other module itself."""
    return model.module if not callable(getattr(model, "buffers", None)) else model


def param_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Model weights: megatron DDP's ``param_data`` buffers where they exist, every parameter's data (views
    of those buffers, or its own storage) and the module's registered buffers."""
    module = _inner_module(model)
    tensors = [buffer.param_data for buffer in _ddp_buffers(model) if buffer.param_data is not None]
    tensors += [param.data for param in module.parameters()]
    tensors += list(module.buffers())
    return tensors


def _inner_optimizers(optimizer) -> list:
    """megatron's optimizer -> its wrapped optimizers (a ChainedOptimizer has several)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _torch_optimizer(optimizer) -> torch.optim.Optimizer | None:
    return getattr(optimizer, "optimizer", optimizer if isinstance(optimizer, torch.optim.Optimizer) else None)


# megatron's fp32 master copies (Float16OptimizerWithFloat16Params, DistributedOptimizer)
_MAIN_PARAM_GROUPS = ("fp32_from_float16_groups", "fp32_from_fp32_groups",
                      "shard_fp32_from_float16_groups", "shard_fp32_groups")


def grad_tensors(model: torch.nn.Module, optimizer=None) -> list[torch.Tensor]:
    """Gradients: DDP's ``grad_data`` buffers, each parameter's ``main_grad`` and ``.grad``, and the ``.grad``
    megatron's optimizer attaches to its (fp32 main) params for the step."""
    module = _inner_module(model)
    tensors = [buffer.grad_data for buffer in _ddp_buffers(model) if buffer.grad_data is not None]
    for param in module.parameters():
        main_grad = getattr(param, "main_grad", None)
        if main_grad is not None:
            tensors.append(main_grad)
        if param.grad is not None:
            tensors.append(param.grad)
    for inner in _inner_optimizers(optimizer) if optimizer is not None else []:
        torch_opt = _torch_optimizer(inner)
        for group in torch_opt.param_groups if torch_opt is not None else []:
            tensors += [p.grad for p in group["params"] if p.grad is not None]
    return tensors


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Optimizer state: every tensor in ``state[p]`` of each wrapped torch optimizer (created lazily by the first
    step), the params it updates (fp32 main params under mixed precision; the model params themselves in fp32,
    which :class:`ActorStateOffloader` leaves to the params group) and megatron's fp32 master copies."""
    tensors: list[torch.Tensor] = []
    for inner in _inner_optimizers(optimizer):
        torch_opt = _torch_optimizer(inner)
        if torch_opt is not None:
            for group in torch_opt.param_groups:
                tensors += list(group["params"])
            for state in torch_opt.state.values():
                tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
        for name in _MAIN_PARAM_GROUPS:
            for group in getattr(inner, name, None) or []:
                tensors += [p for p in group if p is not None]
    return tensors


class ActorStateOffloader:
    """The three switchable groups (params, grads, optimizer) of a megatron DDP model and its optimizer.

    Groups never share a storage: grads exclude param storages, the optimizer group excludes both (in fp32
    the optimizer updates the model params in place; under mixed precision the fp32 main params' ``.grad``
    is DDP's fp32 grad buffer).
    """

    def __init__(self, model: torch.nn.Module, optimizer=None, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device_type: str | None = None):
        def params():
            return param_tensors(model)

        def grads():
            excluded = {storage_key(t) for t in params()}
            return [t for t in grad_tensors(model, optimizer) if storage_key(t) not in excluded]

        def optimizer_state():
            if optimizer is None:
                return []
            excluded = {storage_key(t) for t in params() + grad_tensors(model, optimizer)}
            return [t for t in optimizer_tensors(optimizer) if storage_key(t) not in excluded]

        kwargs = dict(bucket_bytes=bucket_bytes, device_type=device_type)
        self.offloaders = {
            "params": HostOffloader(params, **kwargs),
            "grads": HostOffloader(grads, **kwargs),
            "optimizer": HostOffloader(optimizer_state, **kwargs),
        }

    @staticmethod
    def _selected(params: bool, grads: bool, optimizer: bool) -> list[str]:
        return [name for name, on in zip(GROUPS, (params, grads, optimizer)) if on]

    def offload(self, *, params: bool = True, grads: bool = True, optimizer: bool = True) -> dict[str, OffloadStats]:
        """Offloads the selected groups (already offloaded ones are left as they are)."""
        return {name: self.offloaders[name].offload() for name in self._selected(params, grads, optimizer)}

    def reload(self, *, params: bool = True, grads: bool = True, optimizer: bool = True) -> dict[str, OffloadStats]:
        """Reloads the selected groups (ones not offloaded are left as they are)."""
        return {name: self.offloaders[name].reload() for name in self._selected(params, grads, optimizer)}

    @property
    def offloaded(self) -> dict[str, bool]:
        return {name: offloader.offloaded for name, offloader in self.offloaders.items()}

    def release_host_buffers(self) -> int:
        """Frees the kept host buffers of the groups that are not offloaded; returns the bytes freed."""
        return sum(o.release_host_buffers() for o in self.offloaders.values() if not o.offloaded)
