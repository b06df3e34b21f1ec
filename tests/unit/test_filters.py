import pytest
import torch

from megatron_minio3.algorithms.advantages import compute_grpo_advantages
from megatron_minio3.algorithms.filters import dynamic_sampling_keep_mask, mask_exceeded


def test_dynamic_sampling_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.3, 0.0, 1e-5, 0.0, 2e-4])
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5])
    failed = torch.tensor([False, False, False, False, False, True, False, False, False, False, False])
    keep = dynamic_sampling_keep_mask(rewards, group_ids, failed, min_std=1e-4)
    # 0: spread kept | 1: all equal | 2: judge failure | 3: lone sample (std 0)
    # 4: std 1e-5/sqrt(2) < 1e-4 dropped | 5: std 2e-4/sqrt(2) = 1.41e-4 kept
    assert keep.tolist() == [True, True, False, False, False, False, False, False, False, True, True]


def test_nan_reward_counts_as_failure_when_no_flags_given():
    rewards = torch.tensor([1.0, float("nan"), 1.0, 0.0])
    keep = dynamic_sampling_keep_mask(rewards, torch.tensor([0, 0, 1, 1]))
    assert keep.tolist() == [False, False, True, True]


def test_nan_reward_not_flagged_is_an_error():
    with pytest.raises(ValueError, match="not marked"):
        dynamic_sampling_keep_mask(
            torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), torch.tensor([False, False])
        )


def test_mask_exceeded_rows_and_flat():
    loss_mask_BL = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.float32)
    exceed = torch.tensor([False, True, False])
    expected = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 1, 1]], dtype=torch.float32)
    assert torch.equal(mask_exceeded(loss_mask_BL, exceed), expected)
    seq_ids_T = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert torch.equal(mask_exceeded(loss_mask_BL.reshape(-1), exceed, seq_ids_T), expected.reshape(-1))


def test_exceeded_samples_still_count_in_group_statistics():
    # The recipe: an exceeded trajectory keeps its reward in its group's mean/std and in dynamic sampling,
    # only its loss mask becomes 0. Here the exceeded sample is the only one with a different reward.
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0])
    group_ids = torch.tensor([0, 0, 0, 0])
    assert dynamic_sampling_keep_mask(rewards, group_ids).all()
    advantages = compute_grpo_advantages(rewards, group_ids)
    assert (advantages[:3] > 0).all()


def test_exceed_must_be_bool():
    with pytest.raises(ValueError, match="bool"):
        mask_exceeded(torch.ones(2, 3), torch.tensor([0, 1]))
