"""From scored trajectories to packed micro-batches, in the workers that hold the data (no Megatron here).

Rollout side (the handle that generated the trajectories, workers/rollout_worker.py):
    groups = group_by_prompt(trajectories, results)          # the n samples of each prompt
    keep = groups_to_keep(groups, drop, algorithm)           # dynamic sampling + reward failures
    summary = summarize_group(group, ...)                    # numbers for the controller (trainer/step_plan.py)
    sequences = training_sequences(group, ...)               # advantages, exceed mask, cut to what is attended
Actor side (each data-parallel rank, for the sequences the plan gives it, workers/actor_worker.py):
    item = packing_item(sequence, images, ...)               # pixels from the HF image processor, mrope positions
    micro_batches = pack_rank_share(items, ...)              # packing/: THD micro-batches under the token budget

Every trajectory becomes one packed sequence: `token_ids[:attention_length]` (a final turn cut off by the
length limit is not attended), the loss mask (zero everywhere for an exceeded trajectory when
`algorithm.ignore_exceed`), its group's advantage on every token, and the engine's log-probs as the token
value "rollout_logprobs" (the actor compares its own old log-probs with them).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from megatron_minio3.algorithms import compute_grpo_advantages, dynamic_sampling_keep_mask, mask_exceeded
from megatron_minio3.config.algorithm import AlgorithmConfig
from megatron_minio3.models.qwen2_5_vl.mrope import sequence_position_ids
from megatron_minio3.packing import PackingItem
from megatron_minio3.rewards.types import RewardResult
from megatron_minio3.rollout.trajectory import Trajectory
from megatron_minio3.trainer.step_plan import GroupSummary, SampleSummary, SeqKey


@dataclass
class SampleGroup:
    """The samples of one prompt from one generation round, with their rewards."""

    trajectories: list[Trajectory]
    results: list[RewardResult]

    @property
    def rewards(self) -> list[float]:
        return [result.score for result in self.results]


def group_by_prompt(trajectories: Sequence[Trajectory], results: Sequence[RewardResult]) -> list[SampleGroup]:
    """The samples of one prompt are consecutive, sample 0 first (the agent loop returns them so); a prompt
    handed out twice in one round (a dataset smaller than the batch) makes two groups."""
    if len(trajectories) != len(results):
        raise ValueError(f"{len(trajectories)} trajectories but {len(results)} reward results")
    groups: list[SampleGroup] = []
    for traj, result in zip(trajectories, results):
        if not groups or traj.sample_index == 0 or groups[-1].trajectories[0].uid != traj.uid:
            groups.append(SampleGroup([], []))
        groups[-1].trajectories.append(traj)
        groups[-1].results.append(result)
    return groups


def groups_to_keep(groups: Sequence[SampleGroup], drop: Sequence[bool], algorithm: AlgorithmConfig) -> list[bool]:
    """Per group: False when a sample's reward failure must drop it (`drop`, one flag per sample in group
    order) or, with dynamic sampling, when its rewards have no spread (no learning signal)."""
    if not groups:
        return []
    rewards = torch.tensor([r for group in groups for r in group.rewards], dtype=torch.float64)
    group_ids = torch.cat([torch.full((len(g.trajectories),), i) for i, g in enumerate(groups)])
    min_std = algorithm.dynamic_sampling_min_std if algorithm.dynamic_sampling else 0.0
    keep_N = dynamic_sampling_keep_mask(rewards, group_ids, torch.tensor(list(drop), dtype=torch.bool), min_std)
    return [bool(keep_N[group_ids == i].all()) for i in range(len(groups))]


def trained_loss_mask(traj: Trajectory, algorithm: AlgorithmConfig) -> list[int]:
    """The loss mask of the attended tokens; all zero for an exceeded trajectory with ignore_exceed."""
    mask = torch.tensor(traj.loss_mask[: traj.attention_length], dtype=torch.long)
    if algorithm.ignore_exceed:
        mask = mask_exceeded(mask[None], torch.tensor([traj.exceed]))[0]
    return mask.tolist()


def summarize_group(
    group: SampleGroup, *, handle: int, group_id: int, keep: bool, drop_reason: str, algorithm: AlgorithmConfig
) -> GroupSummary:
    samples = tuple(
        SampleSummary(traj.summary(), result, sum(trained_loss_mask(traj, algorithm)))
        for traj, result in zip(group.trajectories, group.results)
    )
    return GroupSummary(handle, group_id, group.trajectories[0].uid, samples, keep, "" if keep else drop_reason)


@dataclass
class TrainingSequence:
    """One trajectory as a data-parallel rank trains on it: what travels from a rollout handle to the actor."""

    key: SeqKey
    token_ids: list[int]  # the attended tokens
    loss_mask: list[int]  # trained_loss_mask
    rollout_logprobs: list[float]
    advantage: float
    images: list[Image.Image]  # the model-side images the engine saw, in order (a prompt's are shared)
    image_grid_thw: list[tuple[int, int, int]]


def group_advantages(group: SampleGroup, algorithm: AlgorithmConfig) -> list[float]:
    """Each sample's advantage (recipe: (r - mean) / (std + eps) within the group)."""
    rewards = torch.tensor(group.rewards, dtype=torch.float64)
    advantages = compute_grpo_advantages(
        rewards, torch.zeros(len(rewards), dtype=torch.long), algorithm.adv_eps, algorithm.norm_adv_by_std
    )
    return advantages.tolist()


def training_sequences(group: SampleGroup, *, handle: int, group_id: int, algorithm: AlgorithmConfig) -> list[TrainingSequence]:
    """The group's samples with their advantages (group_advantages)."""
    out = []
    for traj, advantage in zip(group.trajectories, group_advantages(group, algorithm)):
        length = traj.attention_length
        out.append(
            TrainingSequence(
                key=(handle, group_id, traj.sample_index),
                token_ids=list(traj.token_ids[:length]),
                loss_mask=trained_loss_mask(traj, algorithm),
                rollout_logprobs=list(traj.rollout_logprobs[:length]),
                advantage=advantage,
                images=[image.model for image in traj.images],
                image_grid_thw=[tuple(image.grid_thw) for image in traj.images],
            )
        )
    return out


class ImageEncoder:
    """Pixel rows of model-side images from the checkpoint's HF image processor, computed once per image
    object (the samples of a prompt share its images)."""

    def __init__(self, model_path: str):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_path)
        self._cache: dict[int, tuple[Image.Image, torch.Tensor]] = {}

    def pixels(self, image: Image.Image, grid_thw: Sequence[int]) -> torch.Tensor:
        cached = self._cache.get(id(image))
        if cached is None:
            out = self.processor(images=[image], return_tensors="pt")
            grid = tuple(int(x) for x in out["image_grid_thw"][0])
            if grid != tuple(grid_thw):
                raise ValueError(
                    f"the image processor makes grid {grid} for an image the rollout recorded as {tuple(grid_thw)}; "
                    "do data.min_pixels/max_pixels fit the checkpoint's image processor?"
                )
            cached = (image, out["pixel_values"])  # the image is kept so that its id stays unique
            self._cache[id(image)] = cached
        return cached[1]

    def clear(self) -> None:
        self._cache.clear()


def packing_item(
    seq: TrainingSequence, images: ImageEncoder, *, image_token_id: int, spatial_merge_size: int
) -> PackingItem:
    token_ids = torch.tensor(seq.token_ids, dtype=torch.long)
    grid = torch.tensor(seq.image_grid_thw, dtype=torch.long).reshape(-1, 3) if seq.images else None
    positions, _ = sequence_position_ids(
        token_ids, grid, image_token_id=image_token_id, spatial_merge_size=spatial_merge_size
    )
    item = PackingItem(
        token_ids=token_ids,
        loss_mask=torch.tensor(seq.loss_mask, dtype=torch.long),
        position_ids=positions,
        pixel_values=torch.cat([images.pixels(im, g) for im, g in zip(seq.images, seq.image_grid_thw)])
        if seq.images else None,
        image_grid_thw=grid,
        token_values={
            "advantages": torch.full((len(seq.token_ids),), seq.advantage, dtype=torch.float32),
            "rollout_logprobs": torch.tensor(seq.rollout_logprobs, dtype=torch.float32),
        },
    )
    item.check_image_tokens(image_token_id, spatial_merge_size)
    return item
