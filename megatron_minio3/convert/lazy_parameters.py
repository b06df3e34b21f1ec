"""Parameters whose values are computed only when a checkpoint writer writes them, and the order in which the
files of a rank are appended to so that each value is computed once and held briefly (no megatron imports;
the writer that uses them is convert/streaming_save.py).
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch

DEFAULT_CACHE_BYTES = 512 * 1024**2


def interleaved_write_order(files: Sequence[Sequence[tuple[Hashable | None, int]]]) -> list[tuple[int, int]]:
    """Order in which to append the items of several files written side by side: (file index, item index) pairs.

    ``files[f]`` lists the items of file f in their (fixed) order, each as (owner, number of bytes); owner is
    the parameter an item is a view of (None: nothing to compute). Each file's items keep their order. At each
    step the head of the first file whose head belongs to an *open* owner (one with items written and items
    left) is taken, so that an owner split over several files (megatron puts the gate and up halves of fc1 in
    different files) is finished before another is started; otherwise the head of the file with the fewest
    bytes written so far (ties: the lowest index), which keeps the files in step as megatron balances them.
    """
    remaining = Counter(owner for items in files for owner, _ in items if owner is not None)
    started: set[Hashable] = set()
    heads = [0] * len(files)
    written = [0] * len(files)
    order: list[tuple[int, int]] = []
    while True:
        live = [f for f in range(len(files)) if heads[f] < len(files[f])]
        if not live:
            return order
        open_heads = [f for f in live if files[f][heads[f]][0] in started]
        chosen = open_heads[0] if open_heads else min(live, key=lambda f: (written[f], f))
        owner, num_bytes = files[chosen][heads[chosen]]
        order.append((chosen, heads[chosen]))
        heads[chosen] += 1
        written[chosen] += num_bytes
        if owner is not None:
            remaining[owner] -= 1
            if remaining[owner]:
                started.add(owner)
            else:
                started.discard(owner)


class LazyParameters:
    """Parameters whose values are computed when written, and a bounded cache of the computed values.

    ``add(param, compute, name)`` registers a parameter (contiguous, its storage not shared with another
    registered one) and a function returning its value (same shape and dtype); the parameter's own memory is
    never read or written. A write item is a view of a parameter's storage (the whole parameter, or part of it,
    e.g. one half of fc1): element (i_0, ..., i_k) of the view is element
    ``view.storage_offset() - param.storage_offset() + sum_j i_j * view.stride(j)`` of the flattened parameter,
    so :meth:`value_of` applies the same ``as_strided`` to the computed value. Computed values are kept while
    items of them are pending (:meth:`expect` counts them, :meth:`release` drops a value after its last item);
    when the kept values exceed ``cache_bytes`` the least recently used ones other than the current one are
    dropped and recomputed if needed again.

    Counters: ``num_computed`` (calls of the compute functions), ``num_recomputed`` (of those, for a parameter
    computed before), ``peak_cached_bytes`` (most bytes of computed values held at once, counted just after a
    value is computed, before the evictions it causes).
    """

    def __init__(self, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.cache_bytes = cache_bytes
        self._sources: dict[int, tuple[torch.Tensor, Callable[[], torch.Tensor], str]] = {}
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._pending: Counter[int] = Counter()
        self._computed_once: set[int] = set()
        self.num_computed = 0
        self.num_recomputed = 0
        self.peak_cached_bytes = 0

    def add(self, param: torch.Tensor, compute: Callable[[], torch.Tensor], name: str) -> None:
        if not param.is_contiguous():
            raise ValueError(f"lazy parameter '{name}' must be contiguous")
        key = self.owner(param)
        if key is None:
            raise ValueError(f"lazy parameter '{name}' has no storage (zero elements)")
        if key in self._sources:
            raise ValueError(f"lazy parameter '{name}' shares its storage with '{self._sources[key][2]}'")
        self._sources[key] = (param, compute, name)

    def __len__(self) -> int:
        return len(self._sources)

    @staticmethod
    def owner(tensor: torch.Tensor) -> int | None:
        """Key of the storage a tensor views (None for an empty storage)."""
        pointer = tensor.untyped_storage().data_ptr()
        return pointer or None

    def is_lazy(self, tensor: torch.Tensor) -> bool:
        return self.owner(tensor) in self._sources

    def expect(self, views: Sequence[torch.Tensor]) -> None:
        """Counts the write items still to come for each lazy parameter."""
        self._pending.update(self.owner(v) for v in views if self.is_lazy(v))

    def value_of(self, view: torch.Tensor) -> torch.Tensor:
        """The values of ``view`` (a view of a registered parameter), computing the parameter if not cached."""
        key = self.owner(view)
        param, compute, name = self._sources[key]
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            value = compute()
            if tuple(value.shape) != tuple(param.shape) or value.dtype != param.dtype:
                raise ValueError(
                    f"'{name}': computed {tuple(value.shape)} {value.dtype}, "
                    f"parameter is {tuple(param.shape)} {param.dtype}"
                )
            value = value.detach().contiguous()
            if value.storage_offset() or value.untyped_storage().nbytes() != value.numel() * value.element_size():
                value = value.clone()
            self.num_computed += 1
            self.num_recomputed += key in self._computed_once
            self._computed_once.add(key)
            self._cache[key] = value
            self._evict(keep=key)
        return self._cache[key].as_strided(view.shape, view.stride(), view.storage_offset() - param.storage_offset())

    def release(self, view: torch.Tensor) -> None:
        """One write item of view's parameter is written; its value is dropped after the last one."""
        key = self.owner(view)
        if key not in self._sources:
            return
        self._pending[key] -= 1
        if self._pending[key] <= 0:
            del self._pending[key]
            self._cache.pop(key, None)

    def cached_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._cache.values())

    def _evict(self, keep: int) -> None:
        self.peak_cached_bytes = max(self.peak_cached_bytes, self.cached_bytes())
        for key in list(self._cache):
            if self.cached_bytes() <= self.cache_bytes:
                break
            if key != keep:
                del self._cache[key]
