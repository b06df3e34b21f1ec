"""GRPO math: advantages, policy loss, KL estimators, sampling filters (pure tensor functions, no ranks)."""
from megatron_minio3.algorithms.advantages import GroupRewardStats, compute_grpo_advantages, group_reward_stats
from megatron_minio3.algorithms.filters import dynamic_sampling_keep_mask, mask_exceeded
from megatron_minio3.algorithms.kl import kl_penalty
from megatron_minio3.algorithms.sft_loss import SftLossOutput, sft_loss
from megatron_minio3.algorithms.policy_loss import (
    LossCounts,
    PolicyLossMetrics,
    PolicyLossOutput,
    count_loss_tokens_and_seqs,
    policy_loss,
)

__all__ = [
    "GroupRewardStats",
    "LossCounts",
    "PolicyLossMetrics",
    "PolicyLossOutput",
    "SftLossOutput",
    "compute_grpo_advantages",
    "count_loss_tokens_and_seqs",
    "dynamic_sampling_keep_mask",
    "group_reward_stats",
    "kl_penalty",
    "mask_exceeded",
    "policy_loss",
    "sft_loss",
]
