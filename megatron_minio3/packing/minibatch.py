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


def balance_data_parallel(
    lengths: list[int], config: PackingConfig, *, dp_size: int, tp_size: int = 1, cp_size: int = 1
) -> list[list[int]]:
    """Indices of the sequences each data-parallel rank trains on: `lengths` (tokens per sequence) balanced
    over `dp_size` ranks by the a*L + b*L^2 workload of their padded slots (Karmarkar-Karp). Needs numbers
    only: the controller plans a step with it before any tensor exists."""
    config.validate()
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    multiple = padding_multiple(tp_size, cp_size)
    workloads = [
        sequence_workload(padded_length(n, multiple), config.workload_linear_coef, config.workload_quadratic_coef)
        for n in lengths
    ]
    return karmarkar_karp(workloads, dp_size)


def pack_rank_share(
    items: list[PackingItem],
    indices: list[int],
    config: PackingConfig,
    *,
    tp_size: int = 1,
    cp_size: int = 1,
    pad_token_id: int = 0,
) -> list[PackedMicroBatch]:
    """One data-parallel rank's sequences packed into micro-batches of at most
    `config.max_tokens_per_microbatch` tokens (padding included); `indices[i]` labels `items[i]` in the
    micro-batches' sample_indices. Every sequence lies whole in one micro-batch."""
    multiple = padding_multiple(tp_size, cp_size)
    plan = plan_micro_batches([padded_length(item.length, multiple) for item in items], config.max_tokens_per_microbatch)
    return [
        pack_sequences([items[i] for i in local], [indices[i] for i in local], multiple, pad_token_id)
        for local in plan
    ]


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
    """Balance `items` over `dp_size` ranks (balance_data_parallel), then pack each rank's share into
    micro-batches (pack_rank_share): the two halves in one process, for callers holding all the data.

    With `image_token_id`, every item's image placeholders are checked against its images first.
    """
    if image_token_id is not None:
        for item in items:
            item.check_image_tokens(image_token_id, spatial_merge_size)
    rank_shares = balance_data_parallel(
        [item.length for item in items], config, dp_size=dp_size, tp_size=tp_size, cp_size=cp_size
    )
    micro_batches = [
        pack_rank_share([items[i] for i in share], share, config, tp_size=tp_size, cp_size=cp_size,
                        pad_token_id=pad_token_id)
        for share in rank_shares
    ]
    counts = [mb.loss_counts() for rank in micro_batches for mb in rank]
    return PackedMiniBatch(
        micro_batches=micro_batches,
        loss_counts=LossCounts(
            num_tokens=sum(c.num_tokens for c in counts), num_seqs=sum(c.num_seqs for c in counts)
        ),
    )
