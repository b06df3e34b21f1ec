"""What the controller knows of a step, and what it decides from it: numbers only.

The driver handles metadata and decisions; the workers hold the data (design.md). A rollout handle keeps
the trajectories of the groups it generated and sends the driver one `GroupSummary` per group: lengths,
loss-token counts, rewards and flags, never tokens or pixels. From those the driver

    collects groups round after round (`Collection`: dynamic sampling across rounds and rollout handles),
    plans the update (`plan_step`: per mini-batch, which sequences each data-parallel rank trains on, and
                       the mini-batch's global loss counts, so the loss does not depend on the split),
    and computes the step's reward/rollout/sampling metrics.

The rollout handles then send each data-parallel rank its sequences directly (object refs; see
workers/placement.py).
"""
from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_minio3.algorithms.policy_loss import LossCounts
from megatron_minio3.config.algorithm import PackingConfig
from megatron_minio3.config.schema import ParallelConfig
from megatron_minio3.packing.minibatch import balance_data_parallel
from megatron_minio3.rewards.types import RewardResult
from megatron_minio3.rollout.trajectory import TrajectorySummary

logger = logging.getLogger(__name__)

SeqKey = tuple[int, int, int]  # (rollout handle, group id on that handle, sample index)


@dataclass(frozen=True)
class SampleSummary:
    trajectory: TrajectorySummary
    reward: RewardResult
    num_loss_tokens: int  # loss tokens of the sequence as trained (0 when over-turn masked)

    @property
    def data_source(self) -> str:
        return self.trajectory.data_source

    @property
    def length(self) -> int:  # tokens of the packed sequence
        return self.trajectory.attention_length


@dataclass(frozen=True)
class GroupSummary:
    """One prompt's samples from one generation round, as the rollout handle holding them describes them."""

    handle: int
    group_id: int
    uid: str
    samples: tuple[SampleSummary, ...]
    keep: bool  # a learning signal and no reward failure (algorithm.dynamic_sampling, reward.drop_failed_groups)
    drop_reason: str = ""  # "reward_failed" | "no_reward_spread" when not kept

    def key(self, sample_index: int) -> SeqKey:
        return (self.handle, self.group_id, sample_index)


@dataclass
class RoundSummary:
    """What one rollout handle returns for one generation round."""

    groups: list[GroupSummary]
    skipped_reasons: list[str]  # one per prompt skipped (bad image, prompt too long, ...)
    wall_s: float  # the rollouts
    reward_s: float = 0.0  # waiting for rewards after the last trajectory (groups are scored as they complete)
    tail_s: float = 0.0  # the last trajectory's finish minus the median finish (agent_loop.tail_seconds)
    engine_stats: list = field(default_factory=list)  # one rollout.engine.EngineStats per engine of the handle
    early_s: float = 0.0  # how long the round ran before it was asked for (started early: trainer.overlap_rounds)


@dataclass
class Collection:
    """The generation rounds of one step: groups are kept in arrival order until `batch_size` are (the batch is
    full), for at most `max_rounds` rounds (trainer.max_generation_rounds with dynamic sampling, else 1)."""

    batch_size: int
    max_rounds: int = 1
    kept: list[GroupSummary] = field(default_factory=list)
    samples: list[SampleSummary] = field(default_factory=list)  # every generated sample, kept or not
    skipped_reasons: list[str] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    samples_per_handle: list[tuple[int, int]] = field(default_factory=list)
    num_rounds: int = 0
    num_groups: int = 0
    generate_s: float = 0.0
    reward_s: float = 0.0
    tail_s: float = 0.0  # summed over rounds (each round's slowest handle)
    early_s: float = 0.0  # summed over rounds (each round's earliest-started handle): generation hidden by overlap
    engine_stats: object = None  # rollout.engine.EngineStats summed over engines and rounds
    engine_wall_s: float = 0.0  # the wall time of those engines, summed likewise

    @property
    def full(self) -> bool:
        return len(self.kept) >= self.batch_size

    @property
    def needs_another_round(self) -> bool:
        return not self.full and self.num_rounds < self.max_rounds

    def shortfall_warning(self, step: int, dynamic_sampling: bool) -> str:
        """What a step that trains on less than a full batch logs ("" when the batch is full)."""
        if self.full:
            return ""
        dropped = (f"{self.dropped['no_reward_spread']} without reward spread, "
                   f"{self.dropped['reward_failed']} with a reward failure")
        have = (f"{len(self.kept)} of the {self.batch_size} groups of trainer.train_batch_size kept "
                f"({self.num_groups} generated: {dropped})")
        if not dynamic_sampling:
            return (f"step {step}: {have} in the one generation round of a step without dynamic sampling; "
                    f"training on those {len(self.kept)}")
        return (f"step {step}: the batch is not full after trainer.max_generation_rounds={self.max_rounds} generation "
                f"round(s): {have}; training on those {len(self.kept)}. Raise trainer.max_generation_rounds (or "
                "trainer.prompts_per_round_multiplier) to keep generating until the batch is full")

    def add_round(self, per_handle: Sequence[RoundSummary]) -> None:
        self.num_rounds += 1
        self.generate_s += max((r.wall_s for r in per_handle), default=0.0)
        self.reward_s += max((r.reward_s for r in per_handle), default=0.0)
        self.tail_s += max((r.tail_s for r in per_handle), default=0.0)
        self.early_s += max((r.early_s for r in per_handle), default=0.0)
        for summary in per_handle:
            for stats in summary.engine_stats:
                self.engine_stats = stats if self.engine_stats is None else self.engine_stats.add(stats)
                self.engine_wall_s += summary.wall_s
        for summary in per_handle:
            self.skipped_reasons += summary.skipped_reasons
            for group in summary.groups:
                self.num_groups += 1
                self.samples_per_handle.append((group.handle, len(group.samples)))
                self.samples += group.samples
                if not group.keep:
                    self.dropped[group.drop_reason] += 1
                elif not self.full:
                    self.kept.append(group)

    def metrics(self) -> dict[str, float]:
        from megatron_minio3.rewards.manager import reward_metrics_by_source
        from megatron_minio3.rollout.agent_loop import rollout_metrics, rollout_metrics_by_source

        per_handle = Counter()
        for handle, num_samples in self.samples_per_handle:
            per_handle[handle] += num_samples
        return {
            **{f"rollout/handle_{h}/num_trajectories": float(n) for h, n in sorted(per_handle.items())},
            **rollout_metrics([s.trajectory for s in self.samples], self.skipped_reasons, self.generate_s),
            **rollout_metrics_by_source([s.trajectory for s in self.samples]),
            **(reward_metrics_by_source(self.samples, [s.reward for s in self.samples]) if self.samples else {}),
            "rollout/reward_s": self.reward_s,
            "rollout/tail_s": self.tail_s,
            "rollout/early_s": self.early_s,
            **(self.engine_stats.metrics(self.engine_wall_s) if self.engine_stats is not None else {}),
            "sampling/num_rounds": float(self.num_rounds),
            "sampling/num_groups": float(self.num_groups),
            "sampling/num_kept_groups": float(len(self.kept)),
            "sampling/num_dropped_groups": float(sum(self.dropped.values())),
            "sampling/num_dropped_no_reward_spread": float(self.dropped["no_reward_spread"]),
            "sampling/num_dropped_reward_failed": float(self.dropped["reward_failed"]),
        }


def collect_rounds(generate_round, sampler, batch_size: int, max_rounds: int, prompts_per_round: int,
                   overlap_rounds: bool = False, step: int = 0) -> Collection:
    """A step's generation rounds (the driver's decisions): rounds of `prompts_per_round` prompts from `sampler`
    until `batch_size` groups are kept, at most `max_rounds` of them. `generate_round(prompts, round_index,
    next_prompts)` runs a round on the rollout handles and returns their RoundSummary list; with `overlap_rounds`
    it is also given the next round's prompts (sampler.peek: the sampler advances only when that round is asked
    for), which the handles may start early. Rounds are taken in order either way, so the kept groups are the
    same with overlap or without."""
    collection = Collection(batch_size, max_rounds)
    while collection.needs_another_round:
        logger.info("step %d: generation round %d: %d prompts (%d of %d groups kept so far)", step,
                    collection.num_rounds + 1, prompts_per_round, len(collection.kept), batch_size)
        prompts = sampler.next(prompts_per_round)
        upcoming = (sampler.peek(prompts_per_round)
                    if overlap_rounds and collection.num_rounds + 1 < collection.max_rounds else None)
        collection.add_round(generate_round(prompts, collection.num_rounds, upcoming))
    return collection


@dataclass(frozen=True)
class MiniBatchPlan:
    ranks: tuple[tuple[SeqKey, ...], ...]  # [dp_rank]: the sequences that rank trains on, in order
    loss_counts: LossCounts  # of the whole mini-batch (all ranks): the loss normalisers

    @property
    def num_sequences(self) -> int:
        return sum(len(keys) for keys in self.ranks)


@dataclass(frozen=True)
class StepPlan:
    mini_batches: tuple[MiniBatchPlan, ...]

    def requests(self, handle: int, dp_size: int) -> list[list[SeqKey]]:
        """[dp_rank]: the keys of `handle`'s sequences that rank needs, over all mini-batches."""
        return [
            [key for mb in self.mini_batches for key in mb.ranks[dp_rank] if key[0] == handle]
            for dp_rank in range(dp_size)
        ]

    @property
    def num_sequences(self) -> int:
        return sum(mb.num_sequences for mb in self.mini_batches)

    @property
    def num_loss_tokens(self) -> int:
        return sum(mb.loss_counts.num_tokens for mb in self.mini_batches)


def mini_batch_loss_counts(samples: Sequence[SampleSummary], seq_mean_denominator: str) -> LossCounts:
    """M and S of a mini-batch (algorithm.seq_mean_denominator: S counts the sequences with a loss token, or all)."""
    with_loss = sum(s.num_loss_tokens > 0 for s in samples)
    return LossCounts(num_tokens=sum(s.num_loss_tokens for s in samples),
                      num_seqs=len(samples) if seq_mean_denominator == "all" else with_loss)


def plan_step(
    groups: Sequence[GroupSummary], groups_per_mini_batch: int, packing: PackingConfig, parallel: ParallelConfig,
    *, seq_mean_denominator: str = "with_loss_tokens",
) -> StepPlan:
    """Mini-batch j holds the samples of groups [j*m, (j+1)*m) (m = groups_per_mini_batch; the last may be
    smaller), balanced over the data-parallel ranks by workload (packing.balance_data_parallel), with its loss
    counts (mini_batch_loss_counts)."""
    if groups_per_mini_batch < 1:
        raise ValueError(f"groups_per_mini_batch must be >= 1, got {groups_per_mini_batch}")
    mini_batches = []
    for first in range(0, len(groups), groups_per_mini_batch):
        chunk = groups[first : first + groups_per_mini_batch]
        keys = [group.key(index) for group in chunk for index in range(len(group.samples))]
        samples = [sample for group in chunk for sample in group.samples]
        if len(samples) < parallel.dp:
            raise ValueError(
                f"a mini-batch of {len(samples)} sequences cannot feed {parallel.dp} data-parallel ranks; "
                "raise actor.ppo_mini_batch_size or rollout.n"
            )
        shares = balance_data_parallel(
            [s.length for s in samples], packing, dp_size=parallel.dp, tp_size=parallel.tp, cp_size=parallel.cp
        )
        counts = mini_batch_loss_counts(samples, seq_mean_denominator)
        mini_batches.append(MiniBatchPlan(tuple(tuple(keys[i] for i in share) for share in shares), counts))
    return StepPlan(tuple(mini_batches))
