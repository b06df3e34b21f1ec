"""Rollout-vs-trainer parity probe, run after each weight sync on a few fixed (prompt, image) pairs.

Per pair, the engine decodes two greedy turns the way a trajectory grows: the prompt (its images), turn 1,
an observation turn holding a fixed crop of the first image (a new image, as after a crop-tool call),
turn 2. The actor then scores the whole sequence and the log-probs of the generated tokens are compared:

    mean |logp_train - logp_rollout|, max |...|, exp(mean |...|)   (1 = identical distributions)

Greedy rollout log-probs are vLLM's log-softmax of the raw logits (no temperature, no logit bias: the probe
bans no token), so the actor must score at temperature 1. A generated image/video placeholder token would be
read as an image; a turn is cut before one.

The three steps run where their parts live; the trainer passes the data between them:
    sequences = await probe.rollout(engine, loop)                       # rollout worker
    items = probe.packing_items(sequences, image_processor, ...)        # -> actor ranks, like trajectories
    metrics = probe.report(sequences, token_logprobs)                   # token-aligned actor log-probs
"""
from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from megatron_minio3.data.images import load_image
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.models.qwen2_5_vl.mrope import sequence_position_ids
from megatron_minio3.packing.thd import PackingItem
from megatron_minio3.rollout.agent_loop import AgentLoop, GenerationEngine, GenerationRequest, SamplingSettings
from megatron_minio3.rollout.crop_tool import image_grid_thw

logger = logging.getLogger(__name__)

METRIC_PREFIX = "probe/"


@dataclass(frozen=True)
class ProbePrompt:
    uid: str
    question: str
    images: tuple[Image.Image, ...]  # raw images, in order (at least one)

    @classmethod
    def from_prompt(cls, prompt: Prompt) -> ProbePrompt:
        return cls(prompt.uid, prompt.question, tuple(load_image(path) for path in prompt.image_paths))


@dataclass(frozen=True)
class ProbeSequence:
    """A probe trajectory: expanded token ids (as the trainer sees them) and the rollout's log-probs."""

    uid: str
    token_ids: tuple[int, ...]
    images: tuple[Image.Image, ...]  # model-side images, in order
    image_grid_thw: tuple[tuple[int, int, int], ...]
    generated_spans: tuple[tuple[int, int], ...]  # [start, stop) of each generated turn
    rollout_logprobs: tuple[float, ...]  # one per generated token, turn after turn

    @property
    def generated_positions(self) -> list[int]:
        return [i for start, stop in self.generated_spans for i in range(start, stop)]


def central_crop(image: Image.Image) -> Image.Image:
    """The middle half (in each direction) of an image: the probe's fixed observation."""
    width, height = image.size
    left, top = width // 4, height // 4
    return image.crop((left, top, max(left + width // 2, left + 1), max(top + height // 2, top + 1)))


def cut_at_placeholder(token_ids: Sequence[int], placeholder_ids: Sequence[int]) -> int:
    """Number of leading tokens before the first image/video placeholder token."""
    for index, token in enumerate(token_ids):
        if token in placeholder_ids:
            return index
    return len(token_ids)


class ParityProbe:
    def __init__(self, prompts: Sequence[ProbePrompt], *, max_tokens: int, warn_mean_abs_diff: float):
        if not prompts:
            raise ValueError("the parity probe needs at least one (prompt, image) pair")
        for prompt in prompts:
            if not prompt.images:
                raise ValueError(f"probe prompt {prompt.uid} has no image")
        if max_tokens < 1:
            raise ValueError(f"probe max_tokens must be at least 1, got {max_tokens}")
        self.prompts = list(prompts)
        self.max_tokens = max_tokens
        self.warn_mean_abs_diff = warn_mean_abs_diff
        self._request_ids = itertools.count()

    async def rollout(self, engine: GenerationEngine, loop: AgentLoop) -> list[ProbeSequence]:
        """Two greedy turns per prompt on `engine` (loop supplies the turn templates and image resizing)."""
        return [await self._rollout_one(engine, loop, prompt) for prompt in self.prompts]

    async def _generate(self, engine: GenerationEngine, loop: AgentLoop, prompt: ProbePrompt, ids, images):
        request = GenerationRequest(
            request_id=f"probe-{prompt.uid}-{next(self._request_ids)}",
            prompt_token_ids=list(ids),
            images=list(images),
            max_tokens=self.max_tokens,
            sampling=SamplingSettings(temperature=0.0),
            stop=(),
        )
        result = await engine.generate(request)
        keep = cut_at_placeholder(result.token_ids, loop.turns.placeholder_ids)
        return result, list(result.token_ids[:keep]), list(result.logprobs[:keep])

    async def _rollout_one(self, engine: GenerationEngine, loop: AgentLoop, prompt: ProbePrompt) -> ProbeSequence:
        images = [loop.model_image(raw, loop.image_resample) for raw in prompt.images]
        compact = loop.turns.prompt_ids(prompt.question, len(images))
        first, generated_1, logprobs_1 = await self._generate(engine, loop, prompt, compact, images)
        observation = loop.model_image(central_crop(prompt.images[0]), loop.crop_resample)
        turn = loop.turns.observation_ids(action=len(images) - 1, observation=len(images))
        images.append(observation)
        second, generated_2, logprobs_2 = await self._generate(
            engine, loop, prompt, compact + generated_1 + turn, images
        )
        history = list(first.prompt_token_ids) + generated_1
        if list(second.prompt_token_ids[: len(history)]) != history:
            raise RuntimeError(f"probe {prompt.uid}: the engine expanded turn 2's prompt differently from turn 1's")
        start_1, start_2 = len(first.prompt_token_ids), len(second.prompt_token_ids)
        return ProbeSequence(
            uid=prompt.uid,
            token_ids=tuple(second.prompt_token_ids) + tuple(generated_2),
            images=tuple(images),
            image_grid_thw=tuple(image_grid_thw(image.size, loop.vision.patch_size) for image in images),
            generated_spans=((start_1, start_1 + len(generated_1)), (start_2, start_2 + len(generated_2))),
            rollout_logprobs=tuple(logprobs_1 + logprobs_2),
        )

    @staticmethod
    def packing_items(
        sequences: Sequence[ProbeSequence], image_processor, *, image_token_id: int, spatial_merge_size: int
    ) -> list[PackingItem]:
        """Actor inputs: pixel values from the checkpoint's HF image processor, mrope positions, and the
        generated tokens as the loss mask."""
        items = []
        for seq in sequences:
            pixels = image_processor(images=list(seq.images), return_tensors="pt")
            grid = pixels["image_grid_thw"]
            if [tuple(g) for g in grid.tolist()] != [tuple(g) for g in seq.image_grid_thw]:
                raise ValueError(
                    f"probe {seq.uid}: the image processor makes grids {grid.tolist()}, the engine used "
                    f"{[list(g) for g in seq.image_grid_thw]}"
                )
            token_ids = torch.tensor(seq.token_ids, dtype=torch.long)
            positions, _ = sequence_position_ids(
                token_ids, grid, image_token_id=image_token_id, spatial_merge_size=spatial_merge_size
            )
            loss_mask = torch.zeros(len(seq.token_ids), dtype=torch.long)
            loss_mask[seq.generated_positions] = 1
            items.append(PackingItem(token_ids, loss_mask, positions, pixels["pixel_values"], grid))
        return items

    def report(self, sequences: Sequence[ProbeSequence], token_logprobs: Sequence[torch.Tensor]) -> dict[str, float]:
        """Metrics from the actor's token-aligned log-probs of each sequence (entry i scores token i);
        logs a warning when the mean absolute difference exceeds the threshold."""
        metrics = parity_metrics(sequences, token_logprobs)
        _warn_on_mismatch(metrics, self.warn_mean_abs_diff, "")
        return metrics


def _warn_on_mismatch(metrics: dict[str, float], threshold: float, where: str) -> None:
    mean = metrics[f"{METRIC_PREFIX}mean_abs_logprob_diff"]
    if mean > threshold:
        logger.warning(
            "rollout/trainer log-prob mismatch%s: mean |diff| %.4g > %.4g (max %.4g over %d tokens); check the "
            "weight sync and the engine's dtype/kernels", where, mean, threshold,
            metrics[f"{METRIC_PREFIX}max_abs_logprob_diff"], int(metrics[f"{METRIC_PREFIX}num_tokens"]),
        )


def engine_probe_metrics(per_engine: dict[int, dict[str, float]], warn_mean_abs_diff: float) -> dict[str, float]:
    """The probe over several engines (each engine's metrics from parity_metrics plus its
    `probe/rollout_logprob_mean`): the worst engine's mean and max |diff| as probe/mean_abs_logprob_diff and
    probe/max_abs_logprob_diff, tokens summed, the engines' mean rollout log-prob, and every engine's own
    mean as probe/engine_<i>/mean_abs_logprob_diff. Warns per engine above the threshold."""
    if not per_engine:
        raise ValueError("no engine reported a probe")
    for index, metrics in sorted(per_engine.items()):
        _warn_on_mismatch(metrics, warn_mean_abs_diff, f" on engine {index}")
    engines = [per_engine[i] for i in sorted(per_engine)]
    mean_key, max_key = f"{METRIC_PREFIX}mean_abs_logprob_diff", f"{METRIC_PREFIX}max_abs_logprob_diff"
    worst = max(m[mean_key] for m in engines)
    out = {
        mean_key: worst,
        max_key: max(m[max_key] for m in engines),
        f"{METRIC_PREFIX}exp_mean_abs_logprob_diff": math.exp(worst),
        f"{METRIC_PREFIX}num_tokens": sum(m[f"{METRIC_PREFIX}num_tokens"] for m in engines),
        f"{METRIC_PREFIX}num_engines": float(len(engines)),
        f"{METRIC_PREFIX}rollout_logprob_mean": sum(m[f"{METRIC_PREFIX}rollout_logprob_mean"] for m in engines)
        / len(engines),
    }
    for index in sorted(per_engine):
        out[f"{METRIC_PREFIX}engine_{index}/mean_abs_logprob_diff"] = per_engine[index][mean_key]
    return out


def parity_metrics(sequences: Sequence[ProbeSequence], token_logprobs: Sequence[torch.Tensor]) -> dict[str, float]:
    """mean/max |logp_train - logp_rollout| over every generated token, and exp(mean |...|)."""
    if len(sequences) != len(token_logprobs):
        raise ValueError(f"{len(sequences)} probe sequences but {len(token_logprobs)} log-prob tensors")
    diffs = []
    for seq, train in zip(sequences, token_logprobs):
        if train.shape != (len(seq.token_ids),):
            raise ValueError(
                f"probe {seq.uid}: log-probs of shape {tuple(train.shape)}, expected ({len(seq.token_ids)},)"
            )
        rollout = torch.tensor(seq.rollout_logprobs, dtype=torch.float64)
        diffs.append((train.double()[seq.generated_positions] - rollout).abs())
    diff = torch.cat(diffs)
    if diff.numel() == 0:
        raise ValueError("the probe generated no token to compare")
    mean = float(diff.mean())
    return {
        f"{METRIC_PREFIX}mean_abs_logprob_diff": mean,
        f"{METRIC_PREFIX}max_abs_logprob_diff": float(diff.max()),
        f"{METRIC_PREFIX}exp_mean_abs_logprob_diff": math.exp(mean),
        f"{METRIC_PREFIX}num_tokens": float(diff.numel()),
    }
