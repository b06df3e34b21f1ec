"""GRPO group statistics and advantages (pure tensor functions, no notion of ranks).

Mini-o3 (as verl's GRPO): A_i = (r_i - mean_g) / (std_g + eps), with the unbiased std of the rewards of
group g (the n samples of one prompt), broadcast over the response tokens by the caller.

Groups of one sample: the unbiased std is undefined (n - 1 = 0) and one sample carries no relative signal,
so its std is reported as 0 and its advantage is exactly 0. (verl instead uses mean 0, std 1 there, which
turns the advantage into the raw reward.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GroupRewardStats:
    """Per-sample view of its group's statistics (all [N], float64)."""

    mean_N: Tensor
    std_N: Tensor  # unbiased; 0 for groups of one sample
    size_N: Tensor  # number of samples in the group (int64)


def group_reward_stats(rewards_N: Tensor, group_ids_N: Tensor) -> GroupRewardStats:
    """Mean, unbiased std and size of each sample's group; `group_ids_N` are arbitrary integer labels."""
    if rewards_N.dim() != 1 or group_ids_N.shape != rewards_N.shape:
        raise ValueError(
            f"rewards and group_ids must be 1-D of the same length, got {tuple(rewards_N.shape)} "
            f"and {tuple(group_ids_N.shape)}"
        )
    if group_ids_N.dtype.is_floating_point or group_ids_N.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids_N.dtype}")
    _, group_index_N = torch.unique(group_ids_N, return_inverse=True)
    num_groups = int(group_index_N.max().item()) + 1 if group_index_N.numel() else 0
    rewards64_N = rewards_N.to(torch.float64)
    size_G = torch.bincount(group_index_N, minlength=num_groups)
    sum_G = torch.zeros(num_groups, dtype=torch.float64, device=rewards_N.device)
    sum_G.index_add_(0, group_index_N, rewards64_N)
    mean_G = sum_G / size_G
    centered_N = rewards64_N - mean_G[group_index_N]
    sq_sum_G = torch.zeros_like(sum_G).index_add_(0, group_index_N, centered_N.square())
    var_G = torch.where(size_G > 1, sq_sum_G / (size_G - 1).clamp(min=1), torch.zeros_like(sq_sum_G))
    return GroupRewardStats(
        mean_N=mean_G[group_index_N], std_N=var_G.sqrt()[group_index_N], size_N=size_G[group_index_N]
    )


def compute_grpo_advantages(
    rewards: Tensor, group_ids: Tensor, eps: float = 1e-6, norm_by_std: bool = True
) -> Tensor:
    """Per-sample GRPO advantages [N] (dtype of `rewards` when floating, float32 otherwise).

    A = (r - mean_g) / (std_g + eps) with the unbiased std (or A = r - mean_g when `norm_by_std` is False).
    Samples alone in their group get A = 0. Rewards must be finite: drop reward failures first
    (`filters.dynamic_sampling_keep_mask`).
    """
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; drop failed groups before computing advantages")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    stats = group_reward_stats(rewards, group_ids)
    advantages_N = rewards.to(torch.float64) - stats.mean_N
    if norm_by_std:
        # A group with zero spread has r - mean = 0 exactly; keep it 0 even when eps is 0.
        denominator_N = stats.std_N + eps
        advantages_N = torch.where(denominator_N > 0, advantages_N / denominator_N, 0.0)
    advantages_N = torch.where(stats.size_N > 1, advantages_N, torch.zeros_like(advantages_N))
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    return advantages_N.to(out_dtype)
