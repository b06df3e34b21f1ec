"""Rewards: verifier registry (mc, exact, math, iou, judge), LLM-judge client, reward manager, reward server."""
from megatron_minio3.rewards.manager import RewardManager, reward_metrics_by_source, validate_reward_config
from megatron_minio3.rewards.types import RewardInput, RewardResult, Verdict
from megatron_minio3.rewards.verifiers import register_verifier

__all__ = [
    "RewardInput",
    "RewardManager",
    "RewardResult",
    "Verdict",
    "register_verifier",
    "reward_metrics_by_source",
    "validate_reward_config",
]
