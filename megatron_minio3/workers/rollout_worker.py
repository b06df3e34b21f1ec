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
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from pathlib import Path
from collections.abc import Sequence

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
            VllmEngine(rollout_cfg, cfg.model, max_images=max_images, group=group)
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

    # ------------------------------------------------------------------ one step's data

    @contextlib.contextmanager
    def _phase(self):
        """A rollout phase on the leader: the followers are released when it ends, however it ends."""
        try:
            yield
        finally:
            for engine in self.engines:
                engine.release_followers()

    def follow(self) -> None:
        """Follower: mirror the leader's engine through one phase (generate_round, probe_rollout, evaluate)."""
        for engine in self.engines:
            engine.follow()

    def generate_round(self, prompts: Sequence[Prompt], step: int, seeds: Sequence[int] | None = None) -> RoundSummary:
        """Roll out rollout.n samples of each prompt, score and group them; keep the groups with a learning
        signal until take_training_shares; return their summaries (step is 1-based, for reward schedules).
        `seeds`: each prompt's base sampling seed (rollout/seeds.py). The group size and the per-turn token limit
        are the trainer.stages schedule's at this step (the driver computes the same, for its logs)."""
        from megatron_minio3.trainer.batch import group_by_prompt, groups_to_keep, summarize_group
        from megatron_minio3.trainer.eval import to_reward_input

        cfg = self.cfg
        if step != self._step:  # a new step: the groups of the last one (a step that trained on none) are gone
            self._step = step
            self._groups.clear()
            self._group_ids = itertools.count()
            self._round = 0
        else:
            self._round += 1
        stage = cfg.trainer.stage_at(step, cfg.rollout.n, cfg.rollout.max_tokens_per_turn)
        self.loop.limits = dataclasses.replace(self._training_limits, max_tokens_per_turn=stage.max_tokens_per_turn)

        async def generate_and_score():
            """Each group is scored as soon as it is complete, while the others generate (an LLM judge's calls
            overlap generation); returns the batch, the results in trajectory order and the seconds spent waiting
            for rewards after the last trajectory (the part of scoring that is still on the critical path)."""
            scoring: list[tuple[list, asyncio.Task]] = []  # (a group's trajectories, their scoring)

            def score_group(index, group):
                scoring.append((group, asyncio.create_task(self.reward.score(
                    [to_reward_input(traj) for traj in group], validation=False, step=step - 1,
                    total_steps=cfg.trainer.total_steps))))

            try:
                batch = await self.loop.run(prompts, stage.n, seeds=seeds, on_group=score_group,
                                            progress_label=f"step {step} generation round {self._round + 1}")
                generated = time.perf_counter()
                scored = await asyncio.gather(*(task for _, task in scoring))
                result_of = {id(traj): result for (group, _), results in zip(scoring, scored)
                             for traj, result in zip(group, results, strict=True)}
                results = [result_of[id(traj)] for traj in batch.trajectories]  # groups finish in any order
                return batch, results, time.perf_counter() - generated
            finally:
                for _, task in scoring:
                    task.cancel()
                await self.reward.aclose()

        with self._phase():
            for engine in self.engines:
                engine.stats(reset=True)
            batch, results, reward_wait_s = asyncio.run(generate_and_score())
            engine_stats = [engine.stats(reset=True) for engine in self.engines]
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
        return RoundSummary(summaries, [s.reason for s in batch.skipped], batch.wall_s, reward_wait_s,
                            tail_s=batch.tail_s, engine_stats=engine_stats)

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
        with self._phase():
            return [asyncio.run(self.probe.rollout(engine, self.loop)) for engine in self.engines]

    def evaluate(self, output_dir: str, step: int) -> dict:
        """Avg@k on data.val_files with the current weights (trainer/eval.py), written under output_dir; `step`
        (1-based) is the training step just done (0: before training; verifier schedules and sampling seeds then
        as at the first step)."""
        from megatron_minio3.trainer.eval import evaluate

        cfg = dataclasses.replace(self.cfg, eval=dataclasses.replace(self.cfg.eval, output_dir=output_dir))
        with self._phase():
            return evaluate(cfg, engines=self.engines, step=max(step - 1, 0), total_steps=cfg.trainer.total_steps)

    def sleep(self, level: int) -> None:
        """Free the engines' accelerator memory (rollout.enable_sleep_mode; a no-op where unsupported):
        level 1 moves the weights to host and drops the KV cache, level 2 drops both."""
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
        for engine in self.engines:
            engine.shutdown()


class RolloutWorker:
    """Ray actor for `trainer.rollout_placement: separate`: a RolloutRuntime receiving weights over a group."""

    def __init__(self, cfg: Config, probe_prompts: Sequence[Prompt], handle: int, env: dict[str, str]):
        os.environ.update(env)
        self.runtime = RolloutRuntime(cfg, probe_prompts, handle=handle)
        self.weight_group = None

    def generate_round(self, prompts: Sequence[Prompt], step: int, seeds: Sequence[int] | None = None) -> RoundSummary:
        return self.runtime.generate_round(prompts, step, seeds)

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
        bucket_bytes = min(engine.cfg.weight_bucket_mb for engine in self.runtime.engines) << 20
        num_tensors = 0
        for named_tensors in receive_buckets(self.weight_group, bucket_bytes):
            for engine in self.runtime.engines:
                num_tensors += engine.update_weights(named_tensors)
        return {"num_tensors": float(num_tensors)}

    def shutdown(self) -> None:
        self.runtime.shutdown()
