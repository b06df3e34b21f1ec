"""Generic tensor-parallel split and merge, driven by how a Megatron tensor is assembled from HF parts.

Every Megatron weight is ``layout.from_parts(hf_parts)``. Tensor parallelism splits each HF part into equal
contiguous chunks along ``tp_dim``; rank r's Megatron shard is ``layout.from_parts(chunk r of each part)``.
That one rule covers plain column/row-parallel weights (one part), the fused QKV weight (q, k, v chunks
by head group, interleaved per group) and the fused gate/up weight ([gate_r; up_r] on each rank).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class PartLayout(Protocol):
    def to_parts(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """The HF tensors a Megatron tensor (full or one TP shard) is made of, in HF name order."""

    def from_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inverse of to_parts."""


def chunk_bounds(length: int, rank: int, size: int, what: str = "tensor") -> tuple[int, int]:
    """[start, stop) of rank's equal chunk of ``length`` elements; ValueError if it does not divide."""
    if length % size:
        raise ValueError(f"{what}: dimension of size {length} does not split evenly over {size} ranks")
    step = length // size
    return rank * step, (rank + 1) * step


def split_for_rank(
    full: torch.Tensor, layout: PartLayout, tp_dim: int | None, rank: int, size: int, what: str = "tensor"
) -> torch.Tensor:
    """Rank's shard of a full (TP=1 layout) Megatron tensor."""
    if tp_dim is None or size == 1:
        return full
    chunks = []
    for part in layout.to_parts(full):
        start, stop = chunk_bounds(part.shape[tp_dim], rank, size, what)
        chunks.append(part.narrow(tp_dim, start, stop - start))
    return layout.from_parts(chunks)


def merge_ranks(shards: Sequence[torch.Tensor], layout: PartLayout, tp_dim: int | None) -> torch.Tensor:
    """Full (TP=1 layout) Megatron tensor from the shards of all TP ranks, in rank order."""
    if tp_dim is None or len(shards) == 1:
        return shards[0]
    per_rank_parts = [layout.to_parts(shard) for shard in shards]
    merged = [torch.cat(list(parts), dim=tp_dim) for parts in zip(*per_rank_parts)]
    return layout.from_parts(merged)
