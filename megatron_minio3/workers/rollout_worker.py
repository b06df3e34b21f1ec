"""The rollout side of one process: vLLM engines, the crop-tool agent loop, rewards, and the step's groups.

`RolloutRuntime` is a plain object and one *rollout handle* of the run. Where it lives depends on
`trainer.rollout_placement`:
- hybrid: inside an actor rank process (workers/actor_worker.py), one per group of rollout.tensor_parallel_size
  ranks; rollout and training take turns in that process and weights go from Megatron into the engines in place;
- separate: inside `RolloutWorker`, a Ray actor of its own, fed weights over a broadcast group.

The handle keeps the data. Per generation round it rolls out its prompts, scores them (RewardManager),
groups them by prompt, decides which groups carry a learning signal, computes their advantages, keeps the
groups it may train on and returns only a `RoundSummary` (numbers) to the controller. When the controller
has planned the update it asks for `take_training_shares`: one list of TrainingSequence per data-parallel
rank, which Ray hands to the actor ranks directly (object refs; the driver never holds them).
This module imports no Megatron code.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from megatron_minio3.config.schema import Config
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.rollout.spmd import EngineGroup
from megatron_minio3.trainer.batch import SampleGroup, TrainingSequence
from megatron_minio3.trainer.step_plan import RoundSummary, SeqKey
from megatron_minio3.weights.probe import ParityProbe, ProbePrompt, ProbeSequence

logger = logging.getLogger(__name__)


class RolloutRuntime:
    """`rollout.num_engines` in-process vLLM engines sharing one agent loop; rollout handle number `handle`.

    With an engine `group` (hybrid placement, rollout.tensor_parallel_size > 1: one engine over several actor
    ranks, rollout/spmd.py) every rank of the group holds a RolloutRuntime; the leader's serves the calls
    below and releases the others, which `follow` meanwhile."""

    def __init__(self, cfg: Config, probe_prompts: Sequence[Prompt], *, handle: int, group: EngineGroup | None = None):
        from megatron_minio3.rewards.manager import RewardManager
        from megatron_minio3.rollout.agent_loop import AgentLoop
        from megatron_minio3.rollout.engine import VllmEngine

        self.cfg = cfg
        self.handle = handle
        # Every training request carries a seed of its own (rollout/seeds.py), so the engines' seed only drives
        # requests without one; all engines (and the ranks of one engine group) share it.
        rollout_cfg = cfg.rollout
        evaluates = cfg.trainer.eval_every or cfg.trainer.eval_before_train
        max_images = max(cfg.rollout.max_images, cfg.eval.max_images if evaluates else 0)
        if group is not None and rollout_cfg.num_engines != 1:
            raise ValueError("rollout.num_engines must be 1 when an engine spans several ranks")
        self.group = group
        self._asleep: set[str] = set()  # what the engines' sleep freed
        self.engines = [
            VllmEngine(rollout_cfg, cfg.model, max_images=max_images, group=group,
                       priority_scheduling=cfg.trainer.overlap_rounds)
            for _ in range(rollout_cfg.num_engines)
        ]
        self.leads = group is None or group.is_leader
        if not self.leads:  # a follower only mirrors the leader's engine calls
            return
        # vLLM CPU pins its threads and then warns on every request that it ignores torch.set_num_threads.
        logging.getLogger("vllm.v1.worker.cpu_worker").setLevel(logging.ERROR)
        first = self.engines[0]
        self.loop = AgentLoop.from_config(self.engines, first.tokenizer, first.vision, rollout_cfg, cfg.data)
        self._training_limits = self.loop.limits  # trainer.stages replace max_tokens_per_turn step by step
        self.reward = RewardManager(cfg.reward)
        self.probe = (
            ParityProbe(
                [ProbePrompt.from_prompt(prompt) for prompt in probe_prompts],
                max_tokens=cfg.weights.probe_max_tokens,
                warn_mean_abs_diff=cfg.weights.probe_warn_mean_abs_diff,
            )
            if probe_prompts
            else None
        )
        self._groups: dict[int, SampleGroup] = {}  # kept groups of the current step, by group id
        self._group_ids = itertools.count()  # numbered from 0 in every step: a resumed step numbers them alike
        self._step = None
        self._round = 0
        # Rounds run on this event loop, in a thread of its own, so that a round started early (overlap_rounds)
        # keeps generating between the controller's calls.
        self._aloop = asyncio.new_event_loop()
        threading.Thread(target=self._aloop.run_forever, name="rollout-loop", daemon=True).start()
        self._early: _RoundRun | None = None  # the next round, started early
        self._rounds_on_loop = 0

    # ------------------------------------------------------------------ one step's data

    @contextlib.contextmanager
    def _phase(self, release: bool = True):
        """A rollout phase on the leader: the followers are released when it ends, however it ends (with
        `release`; a generation round with overlap_rounds leaves that to end_generation)."""
        try:
            yield
        finally:
            if release:
                self._release_followers()

    def _release_followers(self) -> None:
        for engine in self.engines:
            engine.release_followers()

    def follow(self) -> None:
        """Follower: mirror the leader's engine through one phase (generate_round, probe_rollout, evaluate)."""
        for engine in self.engines:
            engine.follow()

    def generate_round(self, prompts: Sequence[Prompt], step: int, seeds: Sequence[int] | None = None,
                       next_round: tuple[Sequence[Prompt], Sequence[int]] | None = None) -> RoundSummary:
        """Roll out rollout.n samples of each prompt, score and group them; keep the groups with a learning
        signal until take_training_shares; return their summaries (step is 1-based, for reward schedules).
        `seeds`: each prompt's base sampling seed (rollout/seeds.py). The group size and the per-turn token limit
        are the trainer.stages schedule's at this step (the driver computes the same, for its logs).
        `next_round` (trainer.overlap_rounds): the next round's (prompts, seeds); it starts once
        trainer.overlap_rounds_at of this round's trajectories have ended and keeps running after this call
        returns. If the next call asks for exactly that round, it takes it over; any other call drops it."""
        from megatron_minio3.trainer.batch import group_by_prompt, groups_to_keep, summarize_group

        cfg = self.cfg
        if step != self._step:  # a new step: the groups of the last one (a step that trained on none) are gone
            self._step = step
            self._groups.clear()
            self._group_ids = itertools.count()
            self._round = 0
        else:
            self._round += 1
        stage = cfg.trainer.stage_at(step, cfg.rollout.n, cfg.rollout.max_tokens_per_turn)
        called = time.perf_counter()
        # with overlap_rounds the followers follow the step's whole generation: a round started early runs between
        # calls (TrainingWorkers.generate_round, end_generation)
        with self._phase(release=not cfg.trainer.overlap_rounds):
            for engine in self.engines:
                engine.stats(reset=True)
            run, self._early = self._early, None
            if run is None or run.key != _round_key(step, self._round, prompts, seeds):
                self._drop(run)
                self.loop.limits = dataclasses.replace(self._training_limits,
                                                       max_tokens_per_turn=stage.max_tokens_per_turn)
                run = self._call_on_loop(self._start_round, prompts, step, self._round, seeds, stage.n)
            if next_round is not None:
                next_prompts, next_seeds = next_round
                self._call_on_loop(run.arm, lambda: self._start_early(next_prompts, step, run.round_index + 1,
                                                                      next_seeds, stage.n),
                                   cfg.trainer.overlap_rounds_at)
            try:
                batch, results, generated = self._result(run)
            except BaseException:
                self.drop_early_round()
                raise
            engine_stats = [engine.stats(reset=True) for engine in self.engines]
        reward_wait_s = time.perf_counter() - max(generated, called)
        early_s = max(called - run.started, 0.0)
        drop = self.reward.drop_mask(results, validation=False)
        groups = group_by_prompt(batch.trajectories, results)
        summaries = []
        offset = 0
        for group, keep in zip(groups, groups_to_keep(groups, drop, cfg.algorithm)):
            failed = any(drop[offset : offset + len(group.trajectories)])
            offset += len(group.trajectories)
            group_id = next(self._group_ids)
            if keep:
                self._groups[group_id] = group
            summaries.append(summarize_group(
                group, handle=self.handle, group_id=group_id, keep=keep,
                drop_reason="reward_failed" if failed else "no_reward_spread", algorithm=cfg.algorithm,
            ))
        every = cfg.trainer.dump_rollouts_every
        if every and step % every == 0 and batch.trajectories:
            self._dump(step, groups, [s.keep for s in summaries])
        return RoundSummary(summaries, [s.reason for s in batch.skipped], max(generated - max(run.started, called), 0.0),
                            reward_wait_s, tail_s=batch.tail_s, engine_stats=engine_stats, early_s=early_s)

    # ------------------------------------------------------------------ rounds on the runtime's event loop

    def _call_on_loop(self, function, *args):
        """function(*args) on the runtime's event loop; its result, in the calling thread."""
        async def call():
            return function(*args)

        return asyncio.run_coroutine_threadsafe(call(), self._aloop).result()

    def _result(self, run: _RoundRun):
        """Wait in the calling thread for a round running on the event loop; its result or its error."""
        async def wait():
            return await run.task

        return asyncio.run_coroutine_threadsafe(wait(), self._aloop).result()

    def _start_round(self, prompts: Sequence[Prompt], step: int, round_index: int, seeds: Sequence[int] | None,
                     n: int) -> _RoundRun:
        """On the event loop: a round's generation and scoring as a task of the loop."""
        run = _RoundRun(_round_key(step, round_index, prompts, seeds), round_index, len(prompts) * n)
        run.task = asyncio.ensure_future(self._generate_and_score(run, prompts, step, seeds, n))
        return run

    def _start_early(self, prompts: Sequence[Prompt], step: int, round_index: int, seeds: Sequence[int],
                     n: int) -> None:
        """On the event loop: start the next round while this one's stragglers finish (trainer.overlap_rounds)."""
        logger.info("step %d: generation round %d starts early (%d prompts) while round %d finishes", step,
                    round_index + 1, len(prompts), round_index)
        self._early = self._start_round(prompts, step, round_index, seeds, n)

    async def _generate_and_score(self, run: _RoundRun, prompts: Sequence[Prompt], step: int,
                                  seeds: Sequence[int] | None, n: int):
        """Each group is scored as soon as it is complete, while the others generate (an LLM judge's calls overlap
        generation); returns the batch, the results in trajectory order and when the last trajectory ended."""
        from megatron_minio3.trainer.eval import to_reward_input

        cfg = self.cfg
        scoring: list[tuple[list, asyncio.Task]] = []  # (a group's trajectories, their scoring)

        def score_group(index, group):
            scoring.append((group, asyncio.create_task(self.reward.score(
                [to_reward_input(traj) for traj in group], validation=False, step=step - 1,
                total_steps=cfg.trainer.total_steps))))

        self._rounds_on_loop += 1
        try:
            batch = await self.loop.run(prompts, n, seeds=seeds, on_group=score_group,
                                        on_trajectory=run.trajectory_ended, priority=run.round_index,
                                        progress_label=f"step {step} generation round {run.round_index + 1}")
            generated = time.perf_counter()
            scored = await asyncio.gather(*(task for _, task in scoring))
            result_of = {id(traj): result for (group, _), results in zip(scoring, scored)
                         for traj, result in zip(group, results, strict=True)}
            results = [result_of[id(traj)] for traj in batch.trajectories]  # groups finish in any order
            return batch, results, generated
        finally:
            for _, task in scoring:
                task.cancel()
            self._rounds_on_loop -= 1
            if not self._rounds_on_loop:  # connections stay open while another round still scores
                await self.reward.aclose()

    def _drop(self, run: _RoundRun | None) -> None:
        """Cancel a round that was started early and not asked for; its requests are aborted in the engines."""
        if run is None:
            return
        self._call_on_loop(run.task.cancel)
        try:
            self._result(run)
        except (asyncio.CancelledError, concurrent.futures.CancelledError):
            pass
        except Exception as exc:  # noqa: BLE001 - a round nobody needs: its failure stops nothing
            logger.warning("generation round %d, started early and not needed, had failed: %r", run.round_index + 1,
                           exc)
        logger.info("generation round %d, started early, was not needed: dropped (%d of %d trajectories had ended)",
                    run.round_index + 1, run.ended, run.total)

    def drop_early_round(self) -> None:
        """A round started early and still running is dropped (the engines must be idle for what comes next)."""
        run, self._early = self._early, None
        self._drop(run)

    def end_generation(self) -> None:
        """The step's generation is over (the driver says so with overlap_rounds): drop a round started early,
        then release the ranks following the engines, which followed the whole generation."""
        try:
            self.drop_early_round()
        finally:
            self._release_followers()

    def _dump(self, step: int, groups: Sequence[SampleGroup], kept: Sequence[bool]) -> None:
        """trainer.dump_rollouts_every: this round's trajectories to <output_dir>/rollouts/step_N, one file per
        handle (the step's first round starts it over: a step run again after a resume replaces its dump)."""
        from megatron_minio3.rollout.trajectory import write_trajectories
        from megatron_minio3.trainer.batch import group_advantages

        trajectories, extras = [], []
        for group, keep in zip(groups, kept):
            for traj, result, advantage in zip(group.trajectories, group.results,
                                               group_advantages(group, self.cfg.algorithm)):
                trajectories.append(traj)
                extras.append({"score": result.score, "accuracy": result.metrics.get("accuracy", 0.0),
                               "reward_failed": result.failed, "reward_error": result.error, "advantage": advantage,
                               "kept": keep, "step": self._step, "round": self._round})
        out_dir = Path(self.cfg.trainer.output_dir) / "rollouts" / f"step_{self._step:08d}"
        path = write_trajectories(trajectories, out_dir, file_name=f"trajectories_handle{self.handle}.jsonl",
                                  extras=extras, append=self._round > 0, image_tag=f"h{self.handle}r{self._round}_")
        logger.info("step %d round %d: %d trajectories written to %s", self._step, self._round, len(trajectories), path)

    def take_training_shares(self, requests: Sequence[Sequence[SeqKey]]) -> list[list[TrainingSequence]]:
        """requests[d]: keys of this handle's sequences that data-parallel rank d trains on. Returns one list per
        rank and forgets every group of the step (the ones not asked for were not needed)."""
        from megatron_minio3.trainer.batch import training_sequences

        needed = {key[1] for keys in requests for key in keys}
        missing = needed - set(self._groups)
        if missing or any(key[0] != self.handle for keys in requests for key in keys):
            raise ValueError(f"rollout handle {self.handle} holds no group {sorted(missing)} (or a key is not its own)")
        sequences = {
            seq.key: seq
            for group_id in sorted(needed)
            for seq in training_sequences(self._groups[group_id], handle=self.handle, group_id=group_id,
                                          algorithm=self.cfg.algorithm)
        }
        self._groups.clear()
        return [[sequences[key] for key in keys] for keys in requests]

    # ------------------------------------------------------------------ probe, evaluation, memory

    def probe_rollout(self) -> list[list[ProbeSequence]]:
        """Greedy two-turn probe sequences on every engine of this handle (weights.probe_*), one list per engine."""
        assert self.probe is not None, "probe_rollout without probe prompts"
        self.drop_early_round()
        with self._phase():
            return [asyncio.run(self.probe.rollout(engine, self.loop)) for engine in self.engines]

    def evaluate(self, output_dir: str, step: int) -> dict:
        """Avg@k on data.val_files with the current weights (trainer/eval.py), written under output_dir; `step`
        (1-based) is the training step just done (0: before training; verifier schedules and sampling seeds then
        as at the first step)."""
        from megatron_minio3.trainer.eval import evaluate

        self.drop_early_round()
        cfg = dataclasses.replace(self.cfg, eval=dataclasses.replace(self.cfg.eval, output_dir=output_dir))
        with self._phase():
            return evaluate(cfg, engines=self.engines, step=max(step - 1, 0), total_steps=cfg.trainer.total_steps)

    def sleep(self, level: int) -> None:
        """Free the engines' accelerator memory (rollout.enable_sleep_mode; a no-op where unsupported):
        level 1 moves the weights to host and drops the KV cache, level 2 drops both."""
        if self.leads:
            self.drop_early_round()
        if self._asleep:
            return
        if all([engine.sleep(level) for engine in self.engines]):
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Bring back what sleep freed (all of it, or the given tags: "weights", "kv_cache"); a no-op when awake."""
        waking = sorted(self._asleep if tags is None else self._asleep & set(tags))
        if waking:
            for engine in self.engines:
                engine.wake_up(waking)
            self._asleep -= set(waking)

    def shutdown(self) -> None:
        if self.leads:
            self.drop_early_round()
            self._aloop.call_soon_threadsafe(self._aloop.stop)
        for engine in self.engines:
            engine.shutdown()


class RolloutWorker:
    """Ray actor for `trainer.rollout_placement: separate`: a RolloutRuntime receiving weights over a group."""

    def __init__(self, cfg: Config, probe_prompts: Sequence[Prompt], handle: int, env: dict[str, str]):
        os.environ.update(env)
        self.runtime = RolloutRuntime(cfg, probe_prompts, handle=handle)
        self.weight_group = None

    def generate_round(self, prompts: Sequence[Prompt], step: int, seeds: Sequence[int] | None = None,
                       next_round: tuple[Sequence[Prompt], Sequence[int]] | None = None) -> RoundSummary:
        return self.runtime.generate_round(prompts, step, seeds, next_round)

    def end_generation(self) -> None:
        self.runtime.end_generation()

    def take_training_shares(self, requests: Sequence[Sequence[SeqKey]]):
        shares = self.runtime.take_training_shares(requests)
        return shares[0] if len(shares) == 1 else tuple(shares)  # one Ray return value per data-parallel rank

    def probe_rollout(self) -> list[list[ProbeSequence]]:
        return self.runtime.probe_rollout()

    def evaluate(self, output_dir: str, step: int) -> dict:
        return self.runtime.evaluate(output_dir, step)

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        """Rank `rank` (>= 1) of the weight group whose rank 0 is the actor's rank 0 (called at the same time)."""
        from megatron_minio3.weights.sync import WeightGroup

        self.weight_group = WeightGroup(host, port, rank, world_size, backend=backend)

    def receive_weights(self) -> dict[str, float]:
        """One sync: every engine of this worker loads each broadcast bucket as it arrives."""
        from megatron_minio3.weights.sync import receive_buckets

        assert self.weight_group is not None, "receive_weights before join_weight_group"
        self.runtime.drop_early_round()  # update_weights needs the engines idle
        bucket_bytes = min(engine.cfg.weight_bucket_mb for engine in self.runtime.engines) << 20
        num_tensors = 0
        for named_tensors in receive_buckets(self.weight_group, bucket_bytes):
            for engine in self.runtime.engines:
                num_tensors += engine.update_weights(named_tensors)
        return {"num_tensors": float(num_tensors)}

    def shutdown(self) -> None:
        self.runtime.shutdown()


def _round_key(step: int, round_index: int, prompts: Sequence[Prompt], seeds: Sequence[int] | None) -> tuple:
    """What identifies a round: a round started early is taken over only by a call asking for exactly it."""
    return step, round_index, tuple(prompt.uid for prompt in prompts), None if seeds is None else tuple(seeds)


@dataclasses.dataclass(eq=False)
class _RoundRun:
    """A generation round running as a task of the runtime's event loop (its fields are touched on that loop)."""

    key: tuple
    round_index: int
    total: int  # trajectories of the round (a skipped prompt's samples end at once)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    task: asyncio.Task | None = None
    ended: int = 0
    start_next: Callable[[], None] | None = None
    start_next_at: float = 1.0

    def trajectory_ended(self) -> None:
        self.ended += 1
        self._start_next_if_due()

    def arm(self, start_next: Callable[[], None], at: float) -> None:
        """Call start_next once `at` of the round's trajectories have ended (now, if they already have)."""
        self.start_next, self.start_next_at = start_next, at
        self._start_next_if_due()

    def _start_next_if_due(self) -> None:
        if self.start_next is not None and self.ended >= self.start_next_at * self.total:
            start, self.start_next = self.start_next, None
            start()
