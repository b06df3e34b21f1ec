"""From scored trajectories to the step's packed mini-batches (controller side, no Megatron).

    groups = group_by_prompt(trajectories, results)          # the n samples of each prompt
    keep = groups_to_keep(groups, drop, algorithm)           # dynamic sampling + reward failures
    items = training_items(kept, algorithm, images, vision)  # advantages, exceed mask, pixels, mrope
    mini_batches = pack_mini_batches(items, ...)             # THD micro-batches per data-parallel rank

Every trajectory becomes one packed sequence: `token_ids[:attention_length]` (a final turn cut off by the
length limit is not attended), the loss mask (zero everywhere for an exceeded trajectory when
`algorithm.ignore_exceed`), its group's advantage on every token, and the engine's log-probs as the token
value "rollout_logprobs" (the actor compares its own old log-probs with them).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_minio3.algorithms import compute_grpo_advantages, dynamic_sampling_keep_mask, mask_exceeded
from megatron_minio3.config.algorithm import AlgorithmConfig, PackingConfig
from megatron_minio3.config.schema import ParallelConfig
from megatron_minio3.models.qwen2_5_vl.mrope import sequence_position_ids
from megatron_minio3.packing import PackedMiniBatch, PackingItem, pack_mini_batch
from megatron_minio3.rewards.types import RewardResult
from megatron_minio3.rollout.tokens import VisionSpec
from megatron_minio3.rollout.trajectory import Trajectory, TrajectoryImage


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


class ImageEncoder:
    """Pixel rows of model-side images from the checkpoint's HF image processor, computed once per image
    (the samples of a prompt share its images)."""

    def __init__(self, model_path: str):
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_path)
        self._cache: dict[int, tuple[TrajectoryImage, torch.Tensor]] = {}

    def pixels(self, image: TrajectoryImage) -> torch.Tensor:
        cached = self._cache.get(id(image))
        if cached is None:
            out = self.processor(images=[image.model], return_tensors="pt")
            grid = tuple(int(x) for x in out["image_grid_thw"][0])
            if grid != tuple(image.grid_thw):
                raise ValueError(
                    f"the image processor makes grid {grid} for an image the rollout recorded as {image.grid_thw}; "
                    "do data.min_pixels/max_pixels fit the checkpoint's image processor?"
                )
            cached = (image, out["pixel_values"])  # the image is kept so that its id stays unique
            self._cache[id(image)] = cached
        return cached[1]

    def clear(self) -> None:
        self._cache.clear()


def training_items(
    groups: Sequence[SampleGroup], algorithm: AlgorithmConfig, images: ImageEncoder, vision: VisionSpec,
    image_token_id: int,
) -> list[PackingItem]:
    """One PackingItem per trajectory of the kept groups, in order."""
    rewards = torch.tensor([r for group in groups for r in group.rewards], dtype=torch.float64)
    group_ids = torch.cat([torch.full((len(g.trajectories),), i) for i, g in enumerate(groups)])
    advantages = compute_grpo_advantages(rewards, group_ids, algorithm.adv_eps, algorithm.norm_adv_by_std)
    trajectories = [traj for group in groups for traj in group.trajectories]
    items = []
    for traj, advantage in zip(trajectories, advantages.tolist()):
        length = traj.attention_length
        token_ids = torch.tensor(traj.token_ids[:length], dtype=torch.long)
        loss_mask = torch.tensor(traj.loss_mask[:length], dtype=torch.long)
        if algorithm.ignore_exceed:
            loss_mask = mask_exceeded(loss_mask[None], torch.tensor([traj.exceed]))[0]
        grid = torch.tensor(traj.image_grid_thw, dtype=torch.long).reshape(-1, 3) if traj.images else None
        positions, _ = sequence_position_ids(
            token_ids, grid, image_token_id=image_token_id, spatial_merge_size=vision.merge_size
        )
        items.append(
            PackingItem(
                token_ids=token_ids,
                loss_mask=loss_mask,
                position_ids=positions,
                pixel_values=torch.cat([images.pixels(image) for image in traj.images]) if traj.images else None,
                image_grid_thw=grid,
                token_values={
                    "advantages": torch.full((length,), advantage, dtype=torch.float32),
                    "rollout_logprobs": torch.tensor(traj.rollout_logprobs[:length], dtype=torch.float32),
                },
            )
        )
    return items


def pack_mini_batches(
    items: Sequence[PackingItem],
    group_sizes: Sequence[int],
    groups_per_mini_batch: int,
    packing: PackingConfig,
    parallel: ParallelConfig,
    *,
    image_token_id: int,
    spatial_merge_size: int,
) -> list[PackedMiniBatch]:
    """Mini-batch j holds the items of groups [j*m, (j+1)*m) (m = groups_per_mini_batch; the last one may be
    smaller), packed and balanced over the data-parallel ranks."""
    if sum(group_sizes) != len(items):
        raise ValueError(f"group sizes add up to {sum(group_sizes)}, there are {len(items)} items")
    bounds = [0]
    for size in group_sizes:
        bounds.append(bounds[-1] + size)
    mini_batches = []
    for first in range(0, len(group_sizes), groups_per_mini_batch):
        last = min(first + groups_per_mini_batch, len(group_sizes))
        chunk = list(items[bounds[first] : bounds[last]])
        if len(chunk) < parallel.dp:
            raise ValueError(
                f"a mini-batch of {len(chunk)} sequences cannot feed {parallel.dp} data-parallel ranks; "
                "raise actor.ppo_mini_batch_size or rollout.n"
            )
        mini_batches.append(
            pack_mini_batch(
                chunk, packing, dp_size=parallel.dp, tp_size=parallel.tp, cp_size=parallel.cp,
                image_token_id=image_token_id, spatial_merge_size=spatial_merge_size,
            )
        )
    return mini_batches
