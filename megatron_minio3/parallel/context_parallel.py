"""Context parallelism for packed (THD) micro-batches: each sequence is split over the CP ranks of its group.

Layout (Megatron's load balancing). A slot of L tokens (L a multiple of 2 * cp, see packing.thd.padding_multiple) is
cut into 2 * cp chunks of c = L / (2 * cp) tokens; CP rank r holds chunk r and chunk 2 * cp - 1 - r, in that order.
Under causal attention chunk j costs ~ j + 1/2 units, so every rank gets (r + 1/2) + (2cp - r - 1/2) = 2cp units.
A rank's local stream is its two chunks of every slot, slot after slot: T / cp tokens.

How it runs. megatron-core is initialised with context_parallel_size=1 and a data-parallel group of dp * cp ranks
(parallel.state), so its DDP reduces gradients and its distributed optimizer shards over dp * cp, and none of its
TE-only context-parallel code paths run. This module owns the CP groups (consecutive ranks of a megatron
data-parallel group: megatron DP rank = dp_rank * cp + cp_rank), and the two places that need the whole sequence:
  * attention: keys and values are all-gathered over the CP group (models.qwen2_5_vl.attention);
  * the vision tower: each image is encoded on one rank of the image group (the TP x CP ranks that share the
    micro-batch) and the features are all-gathered (model.embed); the vision parameters' gradients are then
    summed over TP (workers/actor/step.py), as DDP sums them over dp * cp.
Everything else (embeddings, MLPs, norms, log-probs, the loss) is per token and runs on the local tokens only.
Loss normalisers stay global (counts of the whole mini-batch), so the sum of the local losses over CP ranks is the
sequence's loss and DDP's sum over dp * cp ranks gives the exact gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class ContextShard:
    """Where this CP rank's tokens sit in the full packed micro-batch (all tensors on the CPU, int64)."""

    cp_size: int
    cp_rank: int
    index_T: Tensor  # [T / cp]: positions in the full stream of the local tokens, in local order
    cu_seqlens_padded: Tensor  # [S + 1] int32: the full micro-batch's slot boundaries
    group: dist.ProcessGroup | None  # None only when cp_size == 1

    @property
    def local_cu_seqlens(self) -> Tensor:
        """[S + 1] int32 slot boundaries of the local stream (each slot contributes L / cp tokens)."""
        return (self.cu_seqlens_padded // self.cp_size).to(torch.int32)

    def chunk_length(self, slot: int) -> int:
        lengths = self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]
        return int(lengths[slot]) // (2 * self.cp_size)


def chunk_owner(chunk: int, cp_size: int) -> tuple[int, int]:
    """(CP rank, 0 for its first local chunk / 1 for its second) of global chunk `chunk` of a slot."""
    if not 0 <= chunk < 2 * cp_size:
        raise ValueError(f"chunk {chunk} is outside 0..{2 * cp_size - 1}")
    return (chunk, 0) if chunk < cp_size else (2 * cp_size - 1 - chunk, 1)


def shard_indices(cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int) -> Tensor:
    """[T / cp] int64 positions (in the full stream) of CP rank `cp_rank`'s tokens: chunk r then chunk 2cp-1-r of
    every slot. ValueError when a slot length is not a multiple of 2 * cp."""
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank {cp_rank} is outside a context-parallel group of {cp_size}")
    starts = cu_seqlens_padded[:-1].tolist()
    lengths = (cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).tolist()
    if cp_size == 1:
        return torch.arange(int(cu_seqlens_padded[-1]), dtype=torch.long)
    pieces = []
    for slot, (start, length) in enumerate(zip(starts, lengths)):
        if length % (2 * cp_size):
            raise ValueError(f"slot {slot} has {length} tokens, not a multiple of 2 * cp = {2 * cp_size} "
                             f"(pack with packing.thd.padding_multiple(tp, cp))")
        c = length // (2 * cp_size)
        for chunk in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + chunk * c, start + (chunk + 1) * c, dtype=torch.long))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def make_shard(cu_seqlens_padded: Tensor, cp_size: int, cp_rank: int, group: dist.ProcessGroup | None) -> ContextShard:
    if cp_size > 1 and group is None:
        raise ValueError("a context-parallel shard of cp_size > 1 needs its process group")
    return ContextShard(cp_size=cp_size, cp_rank=cp_rank,
                        index_T=shard_indices(cu_seqlens_padded, cp_size, cp_rank),
                        cu_seqlens_padded=cu_seqlens_padded.to(torch.int32), group=group)


def _supports_reduce_scatter(group: dist.ProcessGroup) -> bool:
    return dist.get_backend(group) == "nccl"


class _GatherFromContextRanks(torch.autograd.Function):
    """all-gather of equally shaped tensors along a new leading dim [cp, ...]; backward sums the gradients of every
    rank's use and keeps this rank's slice (reduce-scatter on NCCL; all-reduce + slice where gloo lacks it), divided
    by `replicas` when that many ranks each hold the same whole gradient (TP ranks using the same tokens)."""

    @staticmethod
    def forward(ctx, local: Tensor, group: dist.ProcessGroup, replicas: int = 1) -> Tensor:
        ctx.group = group
        ctx.replicas = replicas
        size = dist.get_world_size(group)
        out = torch.empty((size, *local.shape), dtype=local.dtype, device=local.device)
        dist.all_gather(list(out.unbind(0)), local.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        group = ctx.group
        rank = dist.get_rank(group)
        grad_out = grad_out.contiguous()
        if _supports_reduce_scatter(group):
            grad = torch.empty_like(grad_out[0])
            dist.reduce_scatter_tensor(grad, grad_out, group=group)
        else:
            dist.all_reduce(grad_out, group=group)
            grad = grad_out[rank].clone()
        if ctx.replicas > 1:
            grad /= ctx.replicas
        return grad, None, None


def gather_from_context_ranks(local: Tensor, group: dist.ProcessGroup, replicas: int = 1) -> Tensor:
    """[ranks, *local.shape]: every rank's tensor (same shape on all ranks), differentiable (see the Function)."""
    return _GatherFromContextRanks.apply(local, group, replicas)


def gather_rows(local_RH: Tensor, counts: list[int], group: dist.ProcessGroup, replicas: int = 1) -> Tensor:
    """[sum(counts), H]: the rows of every rank in rank order; rank i holds counts[i] rows. Differentiable;
    `replicas`: see _GatherFromContextRanks."""
    padded = max(counts)
    rank = dist.get_rank(group)
    if local_RH.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} holds {local_RH.shape[0]} rows, expected {counts[rank]}")
    if local_RH.shape[0] < padded:
        local_RH = torch.cat([local_RH, local_RH.new_zeros((padded - local_RH.shape[0], *local_RH.shape[1:]))])
    gathered = gather_from_context_ranks(local_RH, group, replicas)
    return torch.cat([gathered[i, :n] for i, n in enumerate(counts)])


def unshard(local_T: Tensor, shard: ContextShard) -> Tensor:
    """Per-token values of the local stream [T / cp, ...] back to the full stream [T, ...] (not differentiable)."""
    if shard.cp_size == 1:
        return local_T
    gathered = torch.empty((shard.cp_size, *local_T.shape), dtype=local_T.dtype, device=local_T.device)
    dist.all_gather(list(gathered.unbind(0)), local_T.contiguous(), group=shard.group)
    index_T = torch.cat([shard_indices(shard.cu_seqlens_padded, shard.cp_size, rank)
                         for rank in range(shard.cp_size)])
    full = torch.empty((index_T.numel(), *local_T.shape[1:]), dtype=local_T.dtype, device=local_T.device)
    full[index_T.to(local_T.device)] = gathered.flatten(0, 1)
    return full


def assign_images(patches_per_image: list[int], num_ranks: int) -> list[int]:
    """Rank (of an image group) that encodes each image: greedy by patch count (largest first onto the least loaded
    rank), so the vision tower runs once per image and the ranks' patch loads differ by at most the largest image."""
    load = [0] * num_ranks
    owner = [0] * len(patches_per_image)
    for image in sorted(range(len(patches_per_image)), key=lambda i: (-patches_per_image[i], i)):
        rank = min(range(num_ranks), key=lambda r: (load[r], r))
        owner[image] = rank
        load[rank] += patches_per_image[image]
    return owner


@dataclass(frozen=True)
class ImageSharding:
    """The ranks of a pipeline stage that see the same micro-batches (TP x CP): each image is encoded on one of
    them and the features are all-gathered, instead of every TP and CP rank running the whole vision tower."""

    group: dist.ProcessGroup
    rank: int
    size: int
    replicas: int = 1  # ranks of the group that use the features for the same tokens (TP): identical gradients


_MY_GROUP: dist.ProcessGroup | None = None
_MY_IMAGES: ImageSharding | None = None


def init_context_parallel_groups(cp_size: int) -> dist.ProcessGroup | None:
    """Create the CP groups and the image groups (every rank must call this, after megatron's parallel_state with
    cp folded into DP). CP groups: consecutive blocks of cp ranks of every megatron data-parallel group. Image
    groups: the tp * cp ranks of one pipeline stage and one dp index. Returns this rank's CP group (None at cp 1)."""
    global _MY_GROUP, _MY_IMAGES
    from megatron.core import parallel_state as mpu

    forget_context_parallel_groups()
    world = dist.get_world_size()
    me = dist.get_rank()
    tp, pp = mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()
    if cp_size > 1:
        for ranks in _all_data_parallel_rank_lists(world, mpu):
            if len(ranks) % cp_size:
                raise ValueError(f"data-parallel group {ranks} does not split into context-parallel groups of "
                                 f"{cp_size}")
            for start in range(0, len(ranks), cp_size):
                block = ranks[start:start + cp_size]
                group = dist.new_group(block)
                if me in block:
                    _MY_GROUP = group
    if tp * cp_size > 1:
        folded_dp = world // (tp * pp)  # megatron's DP size: dp * cp
        for stage in range(pp):
            for d in range(folded_dp // cp_size):
                ranks = [stage * tp * folded_dp + (d * cp_size + c) * tp + t for c in range(cp_size) for t in range(tp)]
                group = dist.new_group(ranks)
                if me in ranks:
                    _MY_IMAGES = ImageSharding(group=group, rank=ranks.index(me), size=len(ranks), replicas=tp)
    return _MY_GROUP


def context_parallel_group() -> dist.ProcessGroup | None:
    return _MY_GROUP


def image_sharding() -> ImageSharding | None:
    """This rank's image group (None when every image is this rank's alone: tp = cp = 1)."""
    return _MY_IMAGES


def forget_context_parallel_groups() -> None:
    global _MY_GROUP, _MY_IMAGES
    _MY_GROUP = None
    _MY_IMAGES = None


def _all_data_parallel_rank_lists(world: int, mpu) -> list[list[int]]:
    """Every megatron data-parallel group's ranks in DP-rank order, from the rank order tp-dp-pp (tp fastest) that
    megatron uses with cp folded into dp; checked against this rank's own group."""
    tp, pp = mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()
    dp = world // (tp * pp)
    groups = [[stage * tp * dp + d * tp + t for d in range(dp)] for stage in range(pp) for t in range(tp)]
    mine = dist.get_process_group_ranks(mpu.get_data_parallel_group())
    if mine not in groups:
        raise RuntimeError(f"megatron's data-parallel group {mine} is not in the expected rank order tp-dp-pp")
    return groups
