"""Sample filters before the update: dynamic sampling and over-turn (exceed) masking.

Both are pure tensor functions. Exceeded trajectories are masked out of the loss only; they still count
in their group's reward mean/std (advantages) and in the dynamic-sampling check, as in Mini-o3.
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_minio3.algorithms.advantages import group_reward_stats


def dynamic_sampling_keep_mask(
    rewards: Tensor, group_ids: Tensor, reward_failed: Tensor | None = None, min_std: float = 1e-4
) -> Tensor:
    """Bool [N]: True for samples whose whole group is kept.

    A group is dropped when the unbiased std of its rewards is below `min_std` (no learning signal; a group of
    one sample has std 0) or when any of its samples has a reward failure (`reward_failed[i]` True, e.g. the
    judge failed after its retries). Rewards of failed samples may be NaN; they are never used.
    """
    if min_std < 0:
        raise ValueError(f"min_std must be >= 0, got {min_std}")
    if reward_failed is None:
        reward_failed = ~torch.isfinite(rewards)
    elif reward_failed.shape != rewards.shape or reward_failed.dtype != torch.bool:
        raise ValueError(
            f"reward_failed must be a bool tensor shaped like rewards {tuple(rewards.shape)}, "
            f"got {reward_failed.dtype} {tuple(reward_failed.shape)}"
        )
    if not torch.isfinite(rewards[~reward_failed]).all():
        raise ValueError("rewards contain NaN or inf on samples not marked in reward_failed")
    safe_rewards = torch.where(reward_failed, torch.zeros_like(rewards), rewards)
    std_N = group_reward_stats(safe_rewards, group_ids).std_N
    _, group_index_N = torch.unique(group_ids, return_inverse=True)
    failed_G = torch.bincount(group_index_N, weights=reward_failed.to(torch.float64)) > 0
    return (std_N >= min_std) & ~failed_G[group_index_N]


def mask_exceeded(loss_mask: Tensor, exceed: Tensor, seq_ids: Tensor | None = None) -> Tensor:
    """Loss mask times the over-turn mask: every token of an exceeded trajectory gets 0.

    Either `loss_mask` is [N, ...] with one row per trajectory and `exceed` is bool [N], or `loss_mask` is a
    flat [T] token stream and `seq_ids` [T] gives each token's trajectory index into `exceed`.
    """
    if exceed.dtype != torch.bool or exceed.dim() != 1:
        raise ValueError(f"exceed must be a 1-D bool tensor, got {exceed.dtype} {tuple(exceed.shape)}")
    if seq_ids is None:
        if loss_mask.shape[0] != exceed.shape[0]:
            raise ValueError(
                f"loss_mask has {loss_mask.shape[0]} rows but exceed has {exceed.shape[0]} entries"
            )
        keep = (~exceed).reshape(-1, *([1] * (loss_mask.dim() - 1)))
    else:
        if seq_ids.shape != loss_mask.shape:
            raise ValueError(
                f"seq_ids {tuple(seq_ids.shape)} must be shaped like loss_mask {tuple(loss_mask.shape)}"
            )
        keep = ~exceed[seq_ids]
    return loss_mask * keep.to(loss_mask.dtype)
