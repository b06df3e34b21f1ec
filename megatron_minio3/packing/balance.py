"""Partitioning sequences: data-parallel balancing (Karmarkar-Karp) and token-budget micro-batches.

Pure functions over lists of numbers; they return lists of indices into the caller's list.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Sequence


def sequence_workload(length: int, linear_coef: float, quadratic_coef: float) -> float:
    """Cost model of one sequence of `length` tokens: a * L + b * L^2 (linear layers + causal attention)."""
    return linear_coef * length + quadratic_coef * length * length


def karmarkar_karp(workloads: Sequence[float], num_parts: int) -> list[list[int]]:
    """Split items into `num_parts` parts of near-equal total workload (largest differencing method).

    Each item starts as a num_parts-tuple of subsets with the item alone in one of them. Repeatedly the two
    tuples with the largest spread (max - min subset sum) are merged, pairing the heaviest subset of one with
    the lightest of the other, until one tuple remains. Every part is non-empty when there are at least
    `num_parts` items. Parts are returned with their indices in increasing order.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    if len(workloads) < num_parts:
        raise ValueError(f"cannot split {len(workloads)} sequences into {num_parts} non-empty parts")
    if any(w < 0 or not math.isfinite(w) for w in workloads):
        raise ValueError("workloads must be finite and >= 0")
    # heap entries: (-spread, tie-breaker, parts sorted by sum descending as (sum, indices))
    heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
    for index, workload in enumerate(workloads):
        parts = [(float(workload), [index])] + [(0.0, []) for _ in range(num_parts - 1)]
        heap.append((-float(workload), index, parts))
    heapq.heapify(heap)
    tie_breaker = len(workloads)
    while len(heap) > 1:
        _, _, heavy_first = heapq.heappop(heap)
        _, _, other = heapq.heappop(heap)
        light_first = other[::-1]
        merged = [(a_sum + b_sum, a_idx + b_idx) for (a_sum, a_idx), (b_sum, b_idx) in zip(heavy_first, light_first)]
        merged.sort(key=lambda part: part[0], reverse=True)
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie_breaker, merged))
        tie_breaker += 1
    parts = [sorted(indices) for _, indices in heap[0][2]]
    assert all(parts), "largest differencing left a part empty although there are enough items"
    return parts


def _assign_to_lightest(lengths: Sequence[int], order: list[int], num_bins: int, max_tokens: int):
    """Longest first, each sequence into the currently lightest bin (balanced); None if one does not fit."""
    bins: list[tuple[int, int, list[int]]] = [(0, b, []) for b in range(num_bins)]  # (tokens, id, members)
    for index in order:
        tokens, bin_id, members = heapq.heappop(bins)
        if tokens + lengths[index] > max_tokens:
            return None
        members.append(index)
        heapq.heappush(bins, (tokens + lengths[index], bin_id, members))
    return [members for _, _, members in sorted(bins, key=lambda b: b[1])]


def _assign_first_fit(lengths: Sequence[int], order: list[int], num_bins: int, max_tokens: int):
    """Longest first, each sequence into the first bin with room (tight); None if one does not fit."""
    tokens = [0] * num_bins
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    for index in order:
        fitting = next((b for b in range(num_bins) if tokens[b] + lengths[index] <= max_tokens), None)
        if fitting is None:
            return None
        tokens[fitting] += lengths[index]
        bins[fitting].append(index)
    return bins


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequences into few micro-batches of at most `max_tokens` tokens each, balanced when possible.

    `lengths` are the (already padded) token counts. For k = ceil(total / max_tokens), k + 1, ... the sequences,
    longest first, go to the lightest of k micro-batches (balanced in tokens, which keeps pipeline stages
    even); if that overflows, first-fit-decreasing into k (tighter); the first k where one works is used.
    Empty micro-batches are dropped; each keeps its sequences in increasing index order.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not lengths:
        return []
    too_long = [(i, n) for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        index, length = too_long[0]
        raise ValueError(
            f"{len(too_long)} sequence(s) exceed max_tokens_per_microbatch={max_tokens} (padded), e.g. sequence "
            f"{index} with {length} tokens; raise the budget or lower the rollout's maximum length"
        )
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    # terminates: with one bin per sequence both strategies succeed
    for num_bins in range(max(1, math.ceil(sum(lengths) / max_tokens)), len(lengths) + 1):
        bins = _assign_to_lightest(lengths, order, num_bins, max_tokens) or _assign_first_fit(
            lengths, order, num_bins, max_tokens
        )
        if bins is not None:
            return [sorted(members) for members in bins if members]
    raise AssertionError("unreachable: one sequence per micro-batch always fits")
