"""The multi-turn crop-tool loop: many trajectories at once over one or more generation engines.

Each trajectory is its own chain of requests: the moment its tool result is ready, its next turn is
submitted, so an engine never waits for the slowest trajectory of a turn (`turn_synchronous=True` runs the
same steps in lock-step instead; it exists for comparison in tools/bench/rollout.py).

Per turn (recipe): generate until `</grounding>` or end of turn; no tool call -> the trajectory ends
(`void` when it hit the length limit or does not end with `<answer>...</answer>`); a tool call on the last
allowed turn or with the image limit reached -> `exceed`, end; otherwise the call is executed and its
observation (or the error message) is appended as a user turn in tokens. A user turn that would leave
less than `context_reserve_tokens` of the budget is rolled back and the trajectory ends as `exceed`.
A prompt whose image is missing, corrupt or unusable is skipped with a warning and counted.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
import logging
import statistics
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from PIL import Image

from megatron_minio3.config.data import DataConfig
from megatron_minio3.config.rollout import EvalConfig, RolloutConfig
from megatron_minio3.data.images import ImageLoadError, load_image, resample_from_name
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.progress import Progress
from megatron_minio3.rollout.crop_tool import (
    ToolCallError,
    has_tool_call,
    image_grid_thw,
    locate_crop,
    num_image_tokens,
    parse_grounding,
    resize_for_model,
    resize_for_processor,
)
from megatron_minio3.rollout.seeds import request_seed
from megatron_minio3.rollout.tokens import TurnTokenizer, VisionSpec, expand_image_pads
from megatron_minio3.rollout.trajectory import (
    Trajectory,
    TrajectoryImage,
    TrajectorySummary,
    TurnRecord,
    ends_with_answer,
)

logger = logging.getLogger(__name__)

TOOL_THREADS = 4  # the agent loop's pool for tool calls and prompt preparation


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]  # one `<|image_pad|>` per image; the engine expands them
    images: list[Image.Image]  # model-side images, in order
    max_tokens: int
    sampling: SamplingSettings
    stop: tuple[str, ...]
    # Never to be generated: a generated image/video pad token would be taken for an image placeholder.
    banned_token_ids: tuple[int, ...] = ()
    guided_regex: str = ""  # constrain the turn to this regex ("" = free generation)
    seed: int | None = None  # this request's own sampling seed (rollout/seeds.py); None: the engine's stream
    image_ids: tuple[str, ...] = ()  # a content id per image (image_content_id), or () to let the engine hash them
    continues: bool = False  # a later turn: its prompt extends an earlier request's (prefix-cache statistics)
    priority: int = 0  # lower runs first where the engine schedules by priority (overlapping generation rounds)


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]  # generated ids, stop string / end-of-turn token included
    logprobs: list[float]  # log-prob of each generated id
    text: str  # decoded with special tokens skipped, cut after the stop string
    finish_reason: str  # "stop" or "length"
    prompt_token_ids: list[int]  # the prompt as the engine saw it, image pads expanded
    num_cached_tokens: int = 0  # of the prompt, found in the engine's prefix cache (not computed again)


class GenerationEngine(Protocol):
    async def generate(self, request: GenerationRequest) -> GenerationResult: ...


@dataclass(frozen=True)
class LoopLimits:
    max_turns: int
    max_images: int
    max_tokens_per_turn: int
    max_total_tokens: int
    context_reserve_tokens: int
    stop: tuple[str, ...]
    relative_coordinates: bool
    guided_regex: str = ""
    max_prompt_tokens: int = 0  # 0: only the total budget

    @classmethod
    def for_training(cls, cfg: RolloutConfig) -> LoopLimits:
        return cls(
            max_turns=cfg.max_turns,
            max_images=cfg.max_images,
            max_tokens_per_turn=cfg.max_tokens_per_turn,
            max_total_tokens=cfg.max_total_tokens,
            context_reserve_tokens=cfg.context_reserve_tokens,
            stop=tuple(cfg.stop),
            relative_coordinates=cfg.relative_coordinates,
            guided_regex=cfg.guided_regex,
            max_prompt_tokens=cfg.max_prompt_tokens,
        )

    @classmethod
    def for_evaluation(cls, cfg: RolloutConfig, eval_cfg: EvalConfig) -> LoopLimits:
        train = cls.for_training(cfg)
        return LoopLimits(**{**train.__dict__, "max_turns": eval_cfg.max_turns, "max_images": eval_cfg.max_images})


@dataclass(frozen=True)
class SkippedPrompt:
    uid: str
    reason: str  # image_error | image_too_extreme | too_many_images | prompt_too_long
    detail: str


@dataclass
class RolloutBatch:
    trajectories: list[Trajectory]
    skipped: list[SkippedPrompt]
    wall_s: float
    tail_s: float = 0.0  # the last trajectory's finish minus the median finish (tail_seconds)

    def metrics(self) -> dict[str, float]:
        """Batch-level rollout metrics (means over trajectories, counts, throughput, tail)."""
        return {**rollout_metrics([traj.summary() for traj in self.trajectories],
                                  [s.reason for s in self.skipped], self.wall_s),
                "rollout/tail_s": self.tail_s}


def rollout_metrics(
    summaries: Sequence[TrajectorySummary], skipped_reasons: Sequence[str], wall_s: float
) -> dict[str, float]:
    """rollout/* metrics of a batch from its trajectories' summaries and the reasons prompts were skipped."""
    count = max(len(summaries), 1)
    num_generated = sum(t.num_generated_tokens for t in summaries)
    metrics = {
        "rollout/num_trajectories": float(len(summaries)),
        "rollout/num_skipped_prompts": float(len(skipped_reasons)),
        "rollout/num_turns_mean": sum(t.num_turns for t in summaries) / count,
        "rollout/num_tool_calls_mean": sum(t.num_tool_calls for t in summaries) / count,
        "rollout/num_tool_errors_mean": sum(t.num_tool_errors for t in summaries) / count,
        "rollout/exceed_rate": sum(t.exceed for t in summaries) / count,
        "rollout/void_rate": sum(t.void for t in summaries) / count,
        "rollout/truncated_rate": sum(t.truncated for t in summaries) / count,
        "rollout/generated_tokens_mean": num_generated / count,
        "rollout/sequence_length_mean": sum(t.sequence_length for t in summaries) / count,
        "rollout/wall_s": wall_s,
        "rollout/generated_tokens_per_s": num_generated / wall_s if wall_s > 0 else 0.0,
    }
    for reason, number in Counter(skipped_reasons).items():
        metrics[f"rollout/skipped_{reason}"] = float(number)
    return metrics


def rollout_metrics_by_source(summaries: Sequence[TrajectorySummary]) -> dict[str, float]:
    """rollout/<data_source>/*: the shape of each data source's trajectories (turns, tool calls and errors,
    exceed/void rates, response length), beside reward/<data_source>/*."""
    by_source: dict[str, list[TrajectorySummary]] = {}
    for summary in summaries:
        by_source.setdefault(summary.data_source, []).append(summary)
    metrics = {}
    for source, group in sorted(by_source.items()):
        count = len(group)
        for name, value in (
            ("num_trajectories", count),
            ("num_turns_mean", sum(t.num_turns for t in group) / count),
            ("num_tool_calls_mean", sum(t.num_tool_calls for t in group) / count),
            ("num_tool_errors_mean", sum(t.num_tool_errors for t in group) / count),
            ("exceed_rate", sum(t.exceed for t in group) / count),
            ("void_rate", sum(t.void for t in group) / count),
            ("generated_tokens_mean", sum(t.num_generated_tokens for t in group) / count),
        ):
            metrics[f"rollout/{source}/{name}"] = float(value)
    return metrics


@dataclass
class _PreparedPrompt:
    prompt: Prompt
    images: list[TrajectoryImage]
    compact_ids: list[int]
    expanded_ids: list[int]


class _SkipPrompt(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _TrajectoryState:
    """A trajectory under construction; `request()` and `consume()` alternate until `done`."""

    loop: AgentLoop
    prepared: _PreparedPrompt
    sample_index: int
    prompt_seed: int | None = None  # base seed of the prompt (rollout/seeds.py); None: the engine's stream
    priority: int = 0  # of every request of this trajectory (GenerationRequest.priority)
    compact_ids: list[int] = field(init=False)
    token_ids: list[int] = field(init=False)
    loss_mask: list[int] = field(init=False)
    logprobs: list[float] = field(init=False)
    images: list[TrajectoryImage] = field(init=False)
    turns: list[TurnRecord] = field(default_factory=list)
    turn_texts: list[str] = field(default_factory=list)
    done: bool = False
    pending_call: str | None = None  # the text of a tool call still to execute (run_tool)
    exceed: bool = False
    void: bool = False
    truncated: bool = False
    end_reason: str = ""
    started_at: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.compact_ids = list(self.prepared.compact_ids)
        self.token_ids = list(self.prepared.expanded_ids)
        self.loss_mask = [0] * len(self.token_ids)
        self.logprobs = [0.0] * len(self.token_ids)
        self.images = list(self.prepared.images)

    def request(self) -> GenerationRequest:
        limits = self.loop.limits
        budget = limits.max_total_tokens - len(self.token_ids)
        assert budget > 0, "the context budget is checked before a turn is appended"
        return GenerationRequest(
            request_id=f"{self.prepared.prompt.uid}#{self.sample_index}#t{len(self.turns)}#{next(self.loop.request_counter)}",
            prompt_token_ids=list(self.compact_ids),
            images=[image.model for image in self.images],
            max_tokens=min(limits.max_tokens_per_turn, budget),
            sampling=self.loop.sampling,
            stop=limits.stop,
            banned_token_ids=self.loop.turns.placeholder_ids,
            guided_regex=limits.guided_regex,
            seed=None if self.prompt_seed is None else request_seed(self.prompt_seed, self.sample_index, len(self.turns)),
            image_ids=tuple(image.content_id for image in self.images) if all(i.content_id for i in self.images) else (),
            continues=bool(self.turns),
            priority=self.priority,
        )

    def consume(self, result: GenerationResult, generate_s: float) -> None:
        if result.prompt_token_ids != self.token_ids:
            raise RuntimeError(
                f"{self.prepared.prompt.uid}: the engine expanded the prompt to {len(result.prompt_token_ids)} "
                f"tokens, the record has {len(self.token_ids)}; do the rollout's image settings match the "
                "checkpoint's image processor?"
            )
        if len(result.logprobs) != len(result.token_ids):
            raise RuntimeError(f"engine returned {len(result.logprobs)} log-probs for {len(result.token_ids)} tokens")
        if set(result.token_ids) & set(self.loop.turns.placeholder_ids):
            raise RuntimeError("the engine generated an image/video placeholder token despite the ban")
        limits = self.loop.limits
        turn_index = len(self.turns)
        self.compact_ids += result.token_ids
        self.token_ids += result.token_ids
        self.loss_mask += [1] * len(result.token_ids)
        self.logprobs += result.logprobs
        self.turn_texts.append(result.text)
        turn = TurnRecord(
            num_generated_tokens=len(result.token_ids),
            finish_reason=result.finish_reason,
            tool_call=has_tool_call(result.text),
            generate_s=generate_s,
            num_cached_prompt_tokens=result.num_cached_tokens,
        )
        self.turns.append(turn)
        if not turn.tool_call:
            self._finish_without_call(result)
            return
        if turn_index >= limits.max_turns - 1:
            self._finish_exceeded("max_turns")
            return
        if len(self.images) >= limits.max_images:
            self._finish_exceeded("max_images")
            return
        self.pending_call = result.text

    def run_tool(self) -> None:
        """Execute the pending call and append its observation (or error) turn. Pure CPU work on this trajectory's
        own state: the loop runs it in its tool pool, off the event loop."""
        text, self.pending_call = self.pending_call, None
        assert text is not None, "run_tool without a pending call"
        limits = self.loop.limits
        turn = self.turns[-1]
        tool_started = time.perf_counter()
        new_image, compact_turn = self._run_tool(text, turn)
        counts = [] if new_image is None else [num_image_tokens(new_image.grid_thw, self.loop.vision.merge_size)]
        expanded_turn = expand_image_pads(compact_turn, counts, self.loop.turns.image_pad_id)
        turn.tool_s = time.perf_counter() - tool_started
        if len(self.token_ids) + len(expanded_turn) > limits.max_total_tokens - limits.context_reserve_tokens:
            self._finish_exceeded("context")  # roll back: the observation is not appended
            return
        turn.num_appended_tokens = len(expanded_turn)
        if new_image is not None:
            self.images.append(new_image)
        self.compact_ids += compact_turn
        self.token_ids += expanded_turn
        self.loss_mask += [0] * len(expanded_turn)
        self.logprobs += [0.0] * len(expanded_turn)

    def _run_tool(self, text: str, turn: TurnRecord) -> tuple[TrajectoryImage | None, list[int]]:
        """Execute the call: (the new image, the observation turn) or (None, an error turn)."""
        loop = self.loop
        try:
            index, box = locate_crop(
                [image.raw.size for image in self.images],
                parse_grounding(text),
                relative=loop.limits.relative_coordinates,
                model_sizes=[image.model.size for image in self.images],
            )
            raw = self.images[index].raw.crop(box)
            try:
                model = loop.model_image(raw, loop.crop_resample)
            except ValueError as exc:  # a crop the processor cannot take (aspect ratio after resizing)
                raise ToolCallError(f"the crop {box} cannot be shown: {exc}") from None
        except ToolCallError as exc:
            turn.tool_error = str(exc)
            return None, loop.turns.error_ids(turn.tool_error)
        new_image = TrajectoryImage(
            raw=raw,
            model=model,
            grid_thw=image_grid_thw(model.size, loop.vision.patch_size),
            origin="crop",
            source_index=index,
            box=box,
            content_id=image_content_id(model),
        )
        observation_index = len(self.images)
        return new_image, loop.turns.observation_ids(action=observation_index - 1, observation=observation_index)

    def _finish_without_call(self, result: GenerationResult) -> None:
        self.done = True
        self.truncated = result.finish_reason == "length"
        self.void = self.truncated or not ends_with_answer(result.text)
        self.end_reason = "length" if self.truncated else ("no_answer" if self.void else "answer")

    def _finish_exceeded(self, reason: str) -> None:
        self.done = True
        self.exceed = True
        self.end_reason = reason

    def attention_length(self) -> int:
        if not self.truncated:
            return len(self.token_ids)
        im_end = self.loop.turns.im_end_id
        prompt_length = len(self.prepared.expanded_ids)
        for position in range(len(self.token_ids) - 1, prompt_length - 1, -1):
            if self.token_ids[position] == im_end:
                return position + 1
        return prompt_length

    def to_trajectory(self) -> Trajectory:
        prompt = self.prepared.prompt
        generate_s = sum(turn.generate_s for turn in self.turns)
        tool_s = sum(turn.tool_s for turn in self.turns)
        total_s = time.perf_counter() - self.started_at
        return Trajectory(
            uid=prompt.uid,
            sample_index=self.sample_index,
            data_source=prompt.data_source,
            question=prompt.question,
            ground_truth=prompt.answer,
            verifier=prompt.verifier,
            prompt_length=len(self.prepared.expanded_ids),
            token_ids=self.token_ids,
            loss_mask=self.loss_mask,
            rollout_logprobs=self.logprobs,
            attention_length=self.attention_length(),
            images=self.images,
            turns=self.turns,
            turn_texts=self.turn_texts,
            exceed=self.exceed,
            void=self.void,
            truncated=self.truncated,
            end_reason=self.end_reason,
            total_s=total_s,
            timings={"generate_s": generate_s, "tool_s": tool_s, "wait_s": max(total_s - generate_s - tool_s, 0.0)},
        )


class AgentLoop:
    """Runs the crop-tool loop for a batch of prompts x samples over `engines`."""

    def __init__(
        self,
        engines: Sequence[GenerationEngine],
        turns: TurnTokenizer,
        vision: VisionSpec,
        data_cfg: DataConfig,
        limits: LoopLimits,
        sampling: SamplingSettings,
    ):
        if not engines:
            raise ValueError("AgentLoop needs at least one engine")
        self.engines = list(engines)
        self.turns = turns
        self.vision = vision
        self.data_cfg = data_cfg
        self.limits = limits
        self.sampling = sampling
        self.image_resample = resample_from_name(data_cfg.image_resample, "data.image_resample")
        self.crop_resample = resample_from_name(data_cfg.crop_resample, "data.crop_resample")
        self.request_counter = itertools.count()
        self._active_per_engine = [0] * len(self.engines)
        # Tool calls (crop, resize, tokenize the observation turn) and prompt preparation run here, off the event
        # loop, so that results and next turns of other trajectories are never held up by them.
        self._tool_pool = concurrent.futures.ThreadPoolExecutor(max_workers=TOOL_THREADS,
                                                                thread_name_prefix="agent-tool")
        weakref.finalize(self, self._tool_pool.shutdown, wait=False)

    @classmethod
    def from_config(
        cls,
        engines: Sequence[GenerationEngine],
        tokenizer: object,
        vision: VisionSpec,
        rollout_cfg: RolloutConfig,
        data_cfg: DataConfig,
        eval_cfg: EvalConfig | None = None,
    ) -> AgentLoop:
        """Training settings from `rollout_cfg`; evaluation settings (turn/image limits, sampling, greedy when
        k == 1) when `eval_cfg` is given."""
        if eval_cfg is None:
            limits = LoopLimits.for_training(rollout_cfg)
            sampling = SamplingSettings(rollout_cfg.temperature, rollout_cfg.top_p, rollout_cfg.top_k)
        else:
            limits = LoopLimits.for_evaluation(rollout_cfg, eval_cfg)
            greedy = eval_cfg.k == 1
            sampling = SamplingSettings(0.0 if greedy else eval_cfg.temperature, 1.0 if greedy else eval_cfg.top_p)
        return cls(engines, TurnTokenizer(tokenizer, data_cfg), vision, data_cfg, limits, sampling)

    def model_image(self, image: Image.Image, resample: Image.Resampling) -> Image.Image:
        """Mini-o3's resize, then the processor's own resize, so the engine keeps the image as it is."""
        scaled = resize_for_model(image, self.data_cfg.min_pixels, self.data_cfg.max_pixels, resample)
        return resize_for_processor(scaled, self.vision.min_pixels, self.vision.max_pixels)

    def _prepare(self, prompt: Prompt) -> _PreparedPrompt:
        if len(prompt.image_paths) > self.limits.max_images:
            raise _SkipPrompt("too_many_images", f"{len(prompt.image_paths)} images, the limit is {self.limits.max_images}")
        images = []
        for path in prompt.image_paths:
            try:
                raw = load_image(path)
            except ImageLoadError as exc:
                raise _SkipPrompt("image_error", str(exc)) from None
            try:
                model = self.model_image(raw, self.image_resample)
            except ValueError as exc:  # aspect ratio beyond what the processor accepts
                raise _SkipPrompt("image_too_extreme", f"{path}: {exc}") from None
            images.append(
                TrajectoryImage(
                    raw=raw, model=model, grid_thw=image_grid_thw(model.size, self.vision.patch_size),
                    origin="prompt", path=path, content_id=image_content_id(model),
                )
            )
        compact = self.turns.prompt_ids(prompt.question, len(images))
        counts = [num_image_tokens(image.grid_thw, self.vision.merge_size) for image in images]
        expanded = expand_image_pads(compact, counts, self.turns.image_pad_id)
        room = self.limits.max_total_tokens - self.limits.context_reserve_tokens
        if len(expanded) > room:
            raise _SkipPrompt("prompt_too_long", f"{len(expanded)} prompt tokens, the budget leaves {room}")
        if self.limits.max_prompt_tokens and len(expanded) > self.limits.max_prompt_tokens:
            raise _SkipPrompt("prompt_too_long", f"{len(expanded)} prompt tokens, more than rollout.max_prompt_tokens "
                                                 f"= {self.limits.max_prompt_tokens}")
        return _PreparedPrompt(prompt=prompt, images=images, compact_ids=compact, expanded_ids=expanded)

    async def _in_pool(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tool_pool, function, *args)

    async def _prepare_or_skip(self, prompt: Prompt, skipped: list[SkippedPrompt]) -> _PreparedPrompt | None:
        try:
            return await self._in_pool(self._prepare, prompt)
        except _SkipPrompt as exc:
            logger.warning("skipping prompt %s (%s): %s", prompt.uid, exc.reason, exc.detail)
            skipped.append(SkippedPrompt(prompt.uid, exc.reason, exc.detail))
            return None

    def _pick_engine(self) -> int:
        return min(range(len(self.engines)), key=self._active_per_engine.__getitem__)

    async def _run_chain(self, state: _TrajectoryState) -> Trajectory:
        engine_index = self._pick_engine()
        self._active_per_engine[engine_index] += 1
        try:
            engine = self.engines[engine_index]
            while not state.done:
                submitted = time.perf_counter()
                result = await engine.generate(state.request())
                state.consume(result, time.perf_counter() - submitted)
                if state.pending_call is not None:
                    await self._in_pool(state.run_tool)
        finally:
            self._active_per_engine[engine_index] -= 1
        return state.to_trajectory()

    async def _run_prompt(self, prompt: Prompt, num_samples: int, skipped: list[SkippedPrompt], finished: list[float],
                          prompt_seed: int | None = None, progress: Progress | None = None, priority: int = 0,
                          on_trajectory: Callable[[], None] | None = None) -> list[Trajectory]:
        prepared = await self._prepare_or_skip(prompt, skipped)
        if prepared is None:
            if progress is not None:
                progress.update(num_samples)
            if on_trajectory is not None:
                for _ in range(num_samples):
                    on_trajectory()
            return []
        states = [_TrajectoryState(self, prepared, index, prompt_seed, priority) for index in range(num_samples)]

        async def chain(state: _TrajectoryState) -> Trajectory:
            trajectory = await self._run_chain(state)
            finished.append(time.perf_counter())
            if progress is not None:
                progress.update(1)
            if on_trajectory is not None:
                on_trajectory()
            return trajectory

        return list(await asyncio.gather(*(chain(state) for state in states)))

    async def _run_lock_step(self, prompts: Sequence[Prompt], num_samples: int, skipped: list[SkippedPrompt],
                             finished: list[float], seeds: Sequence[int | None],
                             progress: Progress | None = None) -> list[Trajectory]:
        prepared = await asyncio.gather(*(self._prepare_or_skip(prompt, skipped) for prompt in prompts))
        states = [_TrajectoryState(self, p, i, seed) for p, seed in zip(prepared, seeds) if p is not None
                  for i in range(num_samples)]
        engine_of = {id(state): index % len(self.engines) for index, state in enumerate(states)}
        active = list(states)
        while active:
            started = time.perf_counter()
            requests = [(self.engines[engine_of[id(state)]], state.request()) for state in active]
            results = await asyncio.gather(*(engine.generate(request) for engine, request in requests))
            elapsed = time.perf_counter() - started
            for state, result in zip(active, results):
                state.consume(result, elapsed)
            await asyncio.gather(*(self._in_pool(state.run_tool) for state in active if state.pending_call is not None))
            finished += [time.perf_counter()] * sum(state.done for state in active)
            if progress is not None:
                progress.update(sum(state.done for state in active))
            active = [state for state in active if not state.done]
        return [state.to_trajectory() for state in states]

    async def run(self, prompts: Sequence[Prompt], num_samples: int, *, turn_synchronous: bool = False,
                  seeds: Sequence[int] | None = None, progress_label: str | None = None,
                  on_group: Callable[[int, list[Trajectory]], None] | None = None,
                  on_trajectory: Callable[[], None] | None = None, priority: int = 0) -> RolloutBatch:
        """Roll out `num_samples` trajectories per prompt; results are grouped by prompt, in prompt order.
        `seeds`: one base seed per prompt (rollout/seeds.py), so that every request samples from a stream of its
        own (reproducible whatever else the engine runs); without them the engine's own stream is used.
        `progress_label`: show the finished trajectories under this name (megatron_minio3.progress).
        `on_group(prompt_index, trajectories)`: called on the event loop as soon as a prompt's group is complete
        (not for a skipped prompt), while the other groups still generate; the caller can start scoring it.
        `on_trajectory()`: called on the event loop each time a trajectory ends (a skipped prompt's samples count as
        ended), so a caller can act on the round's progress (rollout_worker: start the next round early).
        `priority`: of every request (GenerationRequest.priority; the round's index when rounds overlap)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if turn_synchronous and (on_group is not None or on_trajectory is not None):
            raise ValueError("on_group and on_trajectory need the asynchronous loop: turn-synchronous trajectories "
                             "end turn by turn together")
        per_prompt = list(seeds) if seeds is not None else [None] * len(prompts)
        started = time.perf_counter()
        skipped: list[SkippedPrompt] = []
        progress = (Progress(len(prompts) * num_samples, progress_label, unit="trajectory")
                    if progress_label else None)
        finished: list[float] = []  # when each trajectory was done
        try:
            if turn_synchronous:
                trajectories = await self._run_lock_step(prompts, num_samples, skipped, finished, per_prompt,
                                                         progress)
            else:
                async def prompt_group(index: int, prompt: Prompt, seed: int | None) -> list[Trajectory]:
                    group = await self._run_prompt(prompt, num_samples, skipped, finished, seed, progress, priority,
                                                   on_trajectory)
                    if on_group is not None and group:
                        on_group(index, group)
                    return group

                groups = await asyncio.gather(*(prompt_group(i, p, seed)
                                                for i, (p, seed) in enumerate(zip(prompts, per_prompt))))
                trajectories = [traj for group in groups for traj in group]
        finally:  # a run cancelled (a round started early and dropped) or failed closes its progress too
            if progress is not None:
                progress.close()
        return RolloutBatch(trajectories=trajectories, skipped=skipped, wall_s=time.perf_counter() - started,
                            tail_s=tail_seconds(finished))


def tail_seconds(finish_times: Sequence[float]) -> float:
    """How long the last trajectory kept the batch waiting: its finish time minus the median finish time."""
    return max(finish_times) - statistics.median(finish_times) if finish_times else 0.0


def image_content_id(image: Image.Image) -> str:
    """An id of an image's pixels (mode, size, bytes), computed once per image so that the engine need not hash
    every image of a trajectory's context again at every turn (vLLM's multi_modal_uuids)."""
    digest = hashlib.blake2b(f"{image.mode}:{image.width}x{image.height}:".encode(), digest_size=16)
    digest.update(image.tobytes())
    return "minio3-" + digest.hexdigest()
