"""A mini-batch of trajectories -> balanced data-parallel shards of packed micro-batches."""
from __future__ import annotations

from dataclasses import dataclass

from megatron_minio3.algorithms.policy_loss import LossCounts
from megatron_minio3.config.algorithm import PackingConfig
from megatron_minio3.packing.balance import karmarkar_karp, plan_micro_batches, sequence_workload
from megatron_minio3.packing.thd import PackedMicroBatch, PackingItem, pack_sequences, padded_length, padding_multiple


@dataclass
class PackedMiniBatch:
    micro_batches: list[list[PackedMicroBatch]]  # [dp_rank][i]; ranks may hold different numbers of them
    loss_counts: LossCounts  # over the whole mini-batch: pass to policy_loss as the global counts

    @property
    def num_tokens(self) -> int:
        return sum(mb.num_tokens for rank in self.micro_batches for mb in rank)

    @property
    def num_real_tokens(self) -> int:
        return sum(mb.num_real_tokens for rank in self.micro_batches for mb in rank)


def pack_mini_batch(
    items: list[PackingItem],
    config: PackingConfig,
    *,
    dp_size: int,
    tp_size: int = 1,
    cp_size: int = 1,
    pad_token_id: int = 0,
    image_token_id: int | None = None,
    spatial_merge_size: int = 2,
) -> PackedMiniBatch:
    """Balance `items` over `dp_size` ranks by the a*L + b*L^2 workload, then pack each rank's share into
    micro-batches of at most `config.max_tokens_per_microbatch` tokens (padding included).

    Every sequence lies whole in one micro-batch. With `image_token_id`, every item's image placeholders are
    checked against its images first.
    """
    config.validate()
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if image_token_id is not None:
        for item in items:
            item.check_image_tokens(image_token_id, spatial_merge_size)
    multiple = padding_multiple(tp_size, cp_size)
    slot_lengths = [padded_length(item.length, multiple) for item in items]
    workloads = [
        sequence_workload(n, config.workload_linear_coef, config.workload_quadratic_coef) for n in slot_lengths
    ]
    rank_shares = karmarkar_karp(workloads, dp_size)
    micro_batches: list[list[PackedMicroBatch]] = []
    for share in rank_shares:
        plan = plan_micro_batches([slot_lengths[i] for i in share], config.max_tokens_per_microbatch)
        rank_micro_batches = []
        for local_indices in plan:
            indices = [share[i] for i in local_indices]
            rank_micro_batches.append(pack_sequences([items[i] for i in indices], indices, multiple, pad_token_id))
        micro_batches.append(rank_micro_batches)
    counts = [mb.loss_counts() for rank in micro_batches for mb in rank]
    return PackedMiniBatch(
        micro_batches=micro_batches,
        loss_counts=LossCounts(
            num_tokens=sum(c.num_tokens for c in counts), num_seqs=sum(c.num_seqs for c in counts)
        ),
    )
