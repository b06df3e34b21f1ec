"""The controller's decisions from numbers only (trainer/step_plan.py) and the worker-side pieces they address
(trainer/batch.py): dynamic sampling across rounds and rollout handles, the mini-batch plan, what each handle
sends to each data-parallel rank, the merged actor and probe reports."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_minio3.algorithms import compute_grpo_advantages
from megatron_minio3.algorithms.policy_loss import LossCounts
from megatron_minio3.config.algorithm import AlgorithmConfig, PackingConfig
from megatron_minio3.config.schema import ParallelConfig
from megatron_minio3.packing import pack_mini_batch
from megatron_minio3.packing.thd import PackingItem
from megatron_minio3.rewards.types import RewardResult
from megatron_minio3.rollout.trajectory import Trajectory, TurnRecord
from megatron_minio3.trainer.batch import SampleGroup, summarize_group, training_sequences
from megatron_minio3.trainer.step_plan import Collection, RoundSummary, plan_step
from megatron_minio3.weights.probe import engine_probe_metrics
from megatron_minio3.workers.placement import engine_handles, train_metrics


def trajectory(uid: str, index: int, length: int, *, exceed: bool = False, source: str = "src") -> Trajectory:
    prompt = 3
    generated = length - prompt
    return Trajectory(
        uid=uid, sample_index=index, data_source=source, question="q", ground_truth="A", verifier=None,
        prompt_length=prompt, token_ids=list(range(length)), loss_mask=[0] * prompt + [1] * generated,
        rollout_logprobs=[0.0] * prompt + [-0.5] * generated, attention_length=length, images=[],
        turns=[TurnRecord(generated, "stop", exceed)], turn_texts=["t"], exceed=exceed, void=False,
        truncated=False, end_reason="max_turns" if exceed else "answer",
    )


def group(uid: str, rewards: list[float], lengths: list[int], exceed: tuple[int, ...] = ()) -> SampleGroup:
    trajs = [trajectory(uid, i, n, exceed=i in exceed) for i, n in enumerate(lengths)]
    return SampleGroup(trajs, [RewardResult(r, failed=math.isnan(r), metrics={"accuracy": r}) for r in rewards])


def summaries(handle: int, groups: list[SampleGroup], keep: list[bool], first_id: int = 0):
    return [summarize_group(g, handle=handle, group_id=first_id + i, keep=k, drop_reason="no_reward_spread",
                            algorithm=AlgorithmConfig()) for i, (g, k) in enumerate(zip(groups, keep))]


def test_collection_keeps_groups_in_arrival_order_until_the_batch_is_full():
    a = summaries(0, [group("a", [1, 0], [8, 9]), group("b", [1, 1], [8, 8])], [True, False])
    b = summaries(1, [group("c", [0, 1], [5, 6]), group("d", [1, 0], [7, 7])], [True, True])
    collection = Collection(batch_size=2)
    collection.add_round([RoundSummary(a, ["image_error"], 2.0), RoundSummary(b, [], 3.0)])
    assert collection.full and [g.uid for g in collection.kept] == ["a", "c"]
    metrics = collection.metrics()
    assert metrics["sampling/num_groups"] == 4 and metrics["sampling/num_kept_groups"] == 2
    assert metrics["sampling/num_dropped_no_reward_spread"] == 1
    assert metrics["rollout/num_trajectories"] == 8 and metrics["rollout/skipped_image_error"] == 1
    assert metrics["rollout/wall_s"] == 3.0  # handles run in parallel: the slowest one
    assert metrics["reward/mean"] == pytest.approx(5 / 8) and metrics["reward/src/num_samples"] == 8


def test_collection_keeps_generating_until_the_batch_is_full():
    rounds = iter([
        [RoundSummary(summaries(0, [group("a", [1, 0], [8, 9]), group("b", [1, 1], [8, 8])], [True, False]), [], 1.0)],
        [RoundSummary(summaries(0, [group("c", [0, 0], [5, 6]), group("d", [1, 1], [7, 7])], [False, False]), [], 1.0)],
        [RoundSummary(summaries(0, [group("e", [0, 1], [5, 6]), group("f", [1, 0], [7, 7])], [True, True]), [], 1.0)],
    ])
    collection = Collection(batch_size=2, max_rounds=16)
    while collection.needs_another_round:  # as GRPOTrainer.collect
        collection.add_round(next(rounds))
    assert collection.full and collection.num_rounds == 3 and [g.uid for g in collection.kept] == ["a", "e"]
    assert collection.shortfall_warning(1, dynamic_sampling=True) == ""


def test_collection_stops_at_the_round_cap_and_says_which_key_to_raise():
    collection = Collection(batch_size=3, max_rounds=2)
    for uid in ("a", "b"):
        groups = [group(uid, [1, 0], [8, 9]), group(uid + "2", [1, 1], [8, 8])]
        assert collection.needs_another_round
        collection.add_round([RoundSummary(summaries(0, groups, [True, False]), [], 1.0)])
    assert not collection.needs_another_round and not collection.full and len(collection.kept) == 2
    warning = collection.shortfall_warning(7, dynamic_sampling=True)
    assert warning.startswith("step 7: the batch is not full after trainer.max_generation_rounds=2 generation "
                              "round(s): 2 of the 3 groups of trainer.train_batch_size kept (4 generated: 2 without reward "
                              "spread, 0 with a reward failure); training on those 2. Raise "
                              "trainer.max_generation_rounds")
    one_round = Collection(batch_size=2)  # without dynamic sampling: one round, whatever it keeps
    one_round.add_round([RoundSummary(summaries(0, [group("a", [1, 0], [8, 9])], [True]), [], 1.0)])
    assert not one_round.needs_another_round
    assert "one generation round of a step without dynamic sampling" in one_round.shortfall_warning(1, False)
    assert "max_generation_rounds" not in one_round.shortfall_warning(1, False)


def test_plan_splits_mini_batches_over_data_parallel_ranks_like_the_packer():
    groups = [group(u, [1, 0, 1, 0], lengths, exceed=(3,)) for u, lengths in
              (("a", [40, 90, 13, 25]), ("b", [64, 64, 30, 8]), ("c", [100, 12, 12, 50]))]
    kept = summaries(0, groups[:2], [True, True]) + summaries(1, groups[2:], [True], first_id=7)
    packing = PackingConfig(max_tokens_per_microbatch=256)
    parallel = ParallelConfig(tp=2, dp=2)
    plan = plan_step(kept, 2, packing, parallel)
    assert len(plan.mini_batches) == 2 and plan.num_sequences == 12
    first = plan.mini_batches[0]
    # the same split as packing everything in one place (pack_mini_batch), and the same loss normalisers
    items = []
    for g in groups[:2]:
        for seq in training_sequences(g, handle=0, group_id=0, algorithm=AlgorithmConfig()):
            n = len(seq.token_ids)
            items.append(PackingItem(torch.tensor(seq.token_ids), torch.tensor(seq.loss_mask),
                                     torch.zeros(3, n, dtype=torch.long)))
    packed = pack_mini_batch(items, packing, dp_size=2, tp_size=2)
    keys = [s.key(i) for s in kept[:2] for i in range(4)]
    for rank in range(2):
        expected = sorted(i for mb in packed.micro_batches[rank] for i in mb.sample_indices)
        assert list(first.ranks[rank]) == [keys[i] for i in expected]
    assert first.loss_counts == packed.loss_counts  # the exceeded samples have no loss token
    assert first.loss_counts.num_seqs == 6
    # every key is asked from its own handle, once, for the rank that trains on it
    requests = [plan.requests(handle, 2) for handle in (0, 1)]
    asked = sorted(key for per_rank in requests for keys in per_rank for key in keys)
    assert asked == sorted(key for mb in plan.mini_batches for rank in mb.ranks for key in rank)
    assert all(key[0] == handle for handle in (0, 1) for keys in requests[handle] for key in keys)
    with pytest.raises(ValueError, match="cannot feed 8 data-parallel ranks"):
        plan_step(kept, 1, packing, ParallelConfig(dp=8))


def test_plan_counts_exceeded_and_empty_sequences_with_seq_mean_denominator_all():
    # a: one exceeded sample (loss mask zeroed); b: one sample of the prompt alone (3 tokens: no loss token)
    kept = summaries(0, [group("a", [1, 0, 1], [40, 90, 13], exceed=(1,)), group("b", [0, 1, 1], [3, 64, 30])],
                     [True, True])
    packing, parallel = PackingConfig(max_tokens_per_microbatch=256), ParallelConfig(dp=2)
    ours = plan_step(kept, 2, packing, parallel)
    original = plan_step(kept, 2, packing, parallel, seq_mean_denominator="all")
    tokens = 37 + 10 + 61 + 27
    assert ours.mini_batches[0].loss_counts == LossCounts(num_tokens=tokens, num_seqs=4)
    assert original.mini_batches[0].loss_counts == LossCounts(num_tokens=tokens, num_seqs=6)
    assert original.mini_batches[0].ranks == ours.mini_batches[0].ranks  # the split does not change


def test_training_sequences_carry_group_advantages_and_the_exceed_mask():
    g = group("a", [1.0, 0.0, 0.5], [10, 11, 12], exceed=(1,))
    sequences = training_sequences(g, handle=2, group_id=5, algorithm=AlgorithmConfig())
    expected = compute_grpo_advantages(torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64), torch.zeros(3, dtype=torch.long), 1e-6, True)
    assert [s.advantage for s in sequences] == pytest.approx(expected.tolist())
    assert [s.key for s in sequences] == [(2, 5, 0), (2, 5, 1), (2, 5, 2)]
    assert sum(sequences[1].loss_mask) == 0 and sum(sequences[0].loss_mask) == 7
    summary = summarize_group(g, handle=2, group_id=5, keep=True, drop_reason="", algorithm=AlgorithmConfig())
    assert [s.num_loss_tokens for s in summary.samples] == [sum(s.loss_mask) for s in sequences]
    kept_exceeded = AlgorithmConfig(ignore_exceed=False)
    assert sum(training_sequences(g, handle=2, group_id=5, algorithm=kept_exceeded)[1].loss_mask) == 8


def test_engines_span_consecutive_ranks():
    assert engine_handles(4, 1) == [0, 1, 2, 3]
    assert engine_handles(8, 4) == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="must divide the actor's 6 ranks"):
        engine_handles(6, 4)


def test_train_reports_merge_over_ranks():
    plan = plan_step(summaries(0, [group("a", [1, 0], [8, 9])], [True]), 1, PackingConfig(), ParallelConfig(dp=2))
    update = {"loss": 0.5, "grad_norm": 2.0, "lr": 1e-6}
    reports = [
        {"writes_results": True, "updates": [update], "timing": {"update": 3.0},
         "logprob_diff": {"abs_diff_sum": 1.0, "abs_diff_max": 0.2, "num_tokens": 10.0}},
        {"writes_results": False, "updates": [], "timing": {"update": 4.0},
         "logprob_diff": {"abs_diff_sum": 0.0, "abs_diff_max": 0.0, "num_tokens": 0.0}},
        {"writes_results": True, "updates": [update], "timing": {"update": 2.0},
         "logprob_diff": {"abs_diff_sum": 3.0, "abs_diff_max": 0.5, "num_tokens": 10.0}},
    ]
    metrics = train_metrics(reports, plan)
    assert metrics["actor/rollout_logprob_diff"] == pytest.approx(0.2)
    assert metrics["actor/rollout_logprob_diff_max"] == 0.5
    assert metrics["timing/update_s"] == 4.0 and metrics["actor/num_updates"] == 1.0
    assert metrics["actor/num_sequences"] == 2 and metrics["actor/num_loss_tokens"] == 11


def test_probe_reports_the_worst_engine(caplog):
    def engine(mean: float, rollout_mean: float) -> dict:
        return {"probe/mean_abs_logprob_diff": mean, "probe/max_abs_logprob_diff": 2 * mean,
                "probe/exp_mean_abs_logprob_diff": math.exp(mean), "probe/num_tokens": 4.0,
                "probe/rollout_logprob_mean": rollout_mean}

    metrics = engine_probe_metrics({0: engine(1e-7, -2.0), 1: engine(3e-2, -4.0)}, warn_mean_abs_diff=1e-3)
    assert metrics["probe/mean_abs_logprob_diff"] == 3e-2 and metrics["probe/max_abs_logprob_diff"] == 6e-2
    assert metrics["probe/engine_0/mean_abs_logprob_diff"] == 1e-7 and metrics["probe/num_engines"] == 2
    assert metrics["probe/num_tokens"] == 8 and metrics["probe/rollout_logprob_mean"] == -3.0
    assert "on engine 1" in caplog.text and "on engine 0" not in caplog.text


def test_engine_statistics_and_tails_add_up_over_engines_and_rounds():
    from megatron_minio3.rollout.engine import EngineStats

    first = EngineStats(requests=10, steps=40, busy_s=3.0, prompt_tokens=1000, cached_prompt_tokens=600,
                        later_prompt_tokens=400, later_cached_prompt_tokens=300, images_sent=20, images_encoded=5)
    second = EngineStats(requests=6, steps=20, busy_s=1.0, prompt_tokens=1000, cached_prompt_tokens=200,
                         later_prompt_tokens=100, later_cached_prompt_tokens=0, images_sent=10, images_encoded=5)
    rows = summaries(0, [group("a", [1, 0], [8, 9])], [True])
    collection = Collection(batch_size=3, max_rounds=2)
    collection.add_round([RoundSummary(rows, [], 4.0, tail_s=1.5, engine_stats=[first]),
                          RoundSummary([], [], 2.0, tail_s=0.5, engine_stats=[second])])
    collection.add_round([RoundSummary([], [], 2.0, tail_s=0.25, engine_stats=[second])])
    metrics = collection.metrics()
    assert metrics["rollout/tail_s"] == 1.75  # each round's slowest handle, summed over rounds
    assert metrics["rollout/engine/prefix_cache_hit_rate"] == pytest.approx(1000 / 3000)
    assert metrics["rollout/engine/prefix_cache_hit_rate_later_turns"] == pytest.approx(300 / 600)
    assert metrics["rollout/engine/encoder_cache_hit_rate"] == pytest.approx(1 - 15 / 40)
    assert metrics["rollout/engine/images_encoded"] == 15 and metrics["rollout/engine/steps"] == 80
    assert metrics["rollout/engine/busy_share"] == pytest.approx(5.0 / 8.0)  # busy over each engine's own wall
    assert EngineStats().metrics(0.0)["rollout/engine/busy_share"] == 0.0
