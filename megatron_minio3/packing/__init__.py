"""THD sequence packing under a token budget, data-parallel balancing, block-diagonal causal masks."""
from megatron_minio3.packing.balance import karmarkar_karp, plan_micro_batches, sequence_workload
from megatron_minio3.packing.minibatch import (
    PackedMiniBatch,
    balance_data_parallel,
    pack_mini_batch,
    pack_rank_share,
)
from megatron_minio3.packing.thd import (
    PackedMicroBatch,
    PackingItem,
    block_causal_mask,
    pack_sequences,
    padded_length,
    padding_multiple,
)

__all__ = [
    "PackedMicroBatch",
    "PackedMiniBatch",
    "PackingItem",
    "balance_data_parallel",
    "block_causal_mask",
    "karmarkar_karp",
    "pack_mini_batch",
    "pack_rank_share",
    "pack_sequences",
    "padded_length",
    "padding_multiple",
    "plan_micro_batches",
    "sequence_workload",
]
