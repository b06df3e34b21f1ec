"""Buckets of full HF tensors laid end to end in one flat buffer: what travels from the trainer to the engines.

No Megatron imports: engine processes use this module to rebuild the tensors of a received bucket.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorEntry:
    """One HF tensor inside a bucket's flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int  # in elements

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Bucket:
    """Full HF tensors of one dtype: laid end to end in one flat buffer, or, for an engine in the exporting
    process, given as `tensors` (in entry order; views of the exporter's parameters where no copy was needed,
    `flat` then holds only the tensors that had to be assembled). Only flat buckets travel between processes."""

    flat: torch.Tensor
    entries: tuple[TensorEntry, ...]
    tensors: tuple[torch.Tensor, ...] | None = None

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        if self.tensors is not None:
            return [(entry.name, tensor) for entry, tensor in zip(self.entries, self.tensors)]
        return bucket_views(self.flat, self.entries)

    @property
    def num_bytes(self) -> int:
        """Bytes of its HF tensors (what the bucket carries, wherever they live)."""
        return sum(entry.numel for entry in self.entries) * self.flat.element_size()


def bucket_views(flat: torch.Tensor, entries: Sequence[TensorEntry]) -> list[tuple[str, torch.Tensor]]:
    """(name, view) of every tensor of a flat bucket buffer."""
    end = max((e.offset + e.numel for e in entries), default=0)
    if flat.dim() != 1 or flat.numel() < end:
        raise ValueError(f"bucket buffer of shape {tuple(flat.shape)} cannot hold its tensors ({end} elements)")
    return [(e.name, flat.narrow(0, e.offset, e.numel).view(e.shape)) for e in entries]
