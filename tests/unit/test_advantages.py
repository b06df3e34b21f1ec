import math

import pytest
import torch

from megatron_minio3.algorithms.advantages import compute_grpo_advantages, group_reward_stats


def test_hand_computed_groups_all_equal_and_singleton():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 2.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    advantages = compute_grpo_advantages(rewards, group_ids)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    a = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected, rtol=0, atol=1e-7)
    assert advantages.dtype == torch.float32
    # all-equal group and the lone sample are exactly zero, not merely small
    assert (advantages[4:] == 0).all()


def test_without_std_normalisation():
    rewards = torch.tensor([3.0, 1.0, 2.0, 5.0])
    group_ids = torch.tensor([4, 4, 9, 9])
    advantages = compute_grpo_advantages(rewards, group_ids, norm_by_std=False)
    torch.testing.assert_close(advantages, torch.tensor([1.0, -1.0, -1.5, 1.5]))


def test_unordered_labels_match_torch_std():
    generator = torch.Generator().manual_seed(0)
    num_groups, group_size = 5, 16
    rewards = torch.rand(num_groups * group_size, generator=generator, dtype=torch.float64)
    group_ids = torch.arange(num_groups).repeat_interleave(group_size) * 37 + 11
    permutation = torch.randperm(rewards.numel(), generator=generator)
    rewards, group_ids = rewards[permutation], group_ids[permutation]
    advantages = compute_grpo_advantages(rewards, group_ids, eps=1e-6)
    for label in group_ids.unique():
        in_group = group_ids == label
        group = rewards[in_group]
        expected = (group - group.mean()) / (group.std(unbiased=True) + 1e-6)
        torch.testing.assert_close(advantages[in_group], expected, rtol=1e-12, atol=1e-12)


def test_zero_eps_all_equal_group_gives_zero_not_nan():
    advantages = compute_grpo_advantages(torch.tensor([0.7, 0.7, 0.7]), torch.tensor([1, 1, 1]), eps=0.0)
    assert torch.equal(advantages, torch.zeros(3))


def test_integer_rewards_give_float_advantages():
    advantages = compute_grpo_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]), norm_by_std=False)
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, torch.tensor([0.5, -0.5]))


def test_group_stats_values():
    stats = group_reward_stats(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([2, 2, 5]))
    torch.testing.assert_close(stats.mean_N, torch.tensor([2.0, 2.0, 10.0], dtype=torch.float64))
    torch.testing.assert_close(stats.std_N, torch.tensor([math.sqrt(2.0), math.sqrt(2.0), 0.0], dtype=torch.float64))
    assert stats.size_N.tolist() == [2, 2, 1]


def test_user_errors():
    with pytest.raises(ValueError, match="NaN or inf"):
        compute_grpo_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="same length"):
        compute_grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        compute_grpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
