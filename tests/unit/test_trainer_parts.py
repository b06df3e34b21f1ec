"""The trainer's pure parts: atomic checkpoints, the prompt sampler, groups and dynamic sampling, the summary."""
from __future__ import annotations

import json
import os

import pytest

from megatron_minio3.config import Config
from megatron_minio3.config.algorithm import AlgorithmConfig
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.rewards.types import RewardResult
from megatron_minio3.rollout.trajectory import Trajectory, TurnRecord
from megatron_minio3.trainer.batch import group_by_prompt, groups_to_keep
from megatron_minio3.config.schema import resume_target
from megatron_minio3.trainer.checkpoint import STATE_FILE, CheckpointError, CheckpointManager
from megatron_minio3.trainer.logging import MetricsLogger, PhaseTimer, read_metrics, summary_lines
from megatron_minio3.trainer.sampler import PromptSampler


def write_shards(directory: str) -> list[dict]:
    with open(os.path.join(directory, "shard_0.distcp"), "wb") as handle:
        handle.write(b"\0" * 128)
    return [{"param_sum": 1.5}]


def test_checkpoint_is_renamed_into_place_only_when_complete(tmp_path):
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.latest() is None
    path = manager.save(1, {"step": 1}, Config(), write_shards)
    assert path == tmp_path / "checkpoints" / "step_00000001" and manager.latest() == path
    state = manager.read_state(path)
    assert {k: v for k, v in state.items() if k != "files"} == {"step": 1, "actor_fingerprint": [{"param_sum": 1.5}]}
    assert set(state["files"]) == {"config.yaml", "shard_0.distcp"}  # every file but the state itself
    assert state["files"]["shard_0.distcp"]["bytes"] == 128
    assert (path / "config.yaml").is_file() and (path / "shard_0.distcp").is_file()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]


@pytest.mark.parametrize("failure", [RuntimeError("a rank died"), KeyboardInterrupt()])
def test_an_interrupted_save_leaves_the_previous_checkpoint_latest(tmp_path, failure):
    manager = CheckpointManager(tmp_path)
    first = manager.save(1, {"step": 1}, Config(), write_shards)

    def half_written(directory: str) -> list[dict]:
        write_shards(directory)
        raise failure

    with pytest.raises(type(failure)):
        manager.save(2, {"step": 2}, Config(), half_written)
    assert manager.latest() == first and manager.read_state(first)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]


def test_leftovers_of_a_killed_save_are_not_checkpoints_and_are_removed(tmp_path):
    manager = CheckpointManager(tmp_path)
    first = manager.save(3, {"step": 3}, Config(), write_shards)
    leftover = tmp_path / ".step_00000004.tmp-abc123"  # what a SIGKILL during a save leaves
    leftover.mkdir()
    (leftover / STATE_FILE).write_text("{}")
    (tmp_path / "step_00000005").mkdir()  # a directory without trainer state is not a checkpoint either
    assert manager.latest() == first
    assert manager.remove_incomplete() == [leftover] and not leftover.exists()


def test_finished_checkpoints_are_never_overwritten_and_pruning_keeps_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, {"step": step}, Config(), write_shards)
    assert [step for step, _ in manager.complete()] == [2, 3]
    with pytest.raises(ValueError, match="refusing to overwrite a finished checkpoint"):
        manager.save(3, {"step": 3}, Config(), write_shards)
    assert manager.read_state(manager.latest())["step"] == 3


def damage(path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "same size":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        path.unlink()


@pytest.mark.parametrize("how, reason", [("truncated", "64 bytes, 128 were written"),
                                         ("same size", "SHA-256 differs"), ("missing", "missing")])
def test_a_damaged_checkpoint_names_its_file_and_the_previous_complete_one(tmp_path, how, reason):
    manager = CheckpointManager(tmp_path)
    for step in (1, 2, 3):
        manager.save(step, {"step": step}, Config(), write_shards)
    damage(tmp_path / "step_00000003" / "shard_0.distcp", how)
    damage(tmp_path / "step_00000002" / "shard_0.distcp", "truncated")  # the one before it is bad too
    assert manager.select("step_00000001") == tmp_path / "step_00000001"  # a good one still loads
    with pytest.raises(CheckpointError) as error:
        manager.select(True)
    message = str(error.value)
    assert "\n" not in message and reason in message
    assert f"{tmp_path / 'step_00000003' / 'shard_0.distcp'}: " in message
    assert f"the previous complete checkpoint is {tmp_path / 'step_00000001'}: resume from it with " \
           "trainer.resume=1" in message


def test_a_checkpoint_with_an_unreadable_state_or_none_before_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save(1, {"step": 1}, Config(), write_shards)
    (path / STATE_FILE).write_text('{"step": 1, "files": {')
    with pytest.raises(CheckpointError, match=r"trainer_state.json: cannot be read .*no earlier complete checkpoint"):
        manager.select(True)


def test_resume_names_a_step_and_a_later_checkpoint_is_set_aside(tmp_path):
    manager = CheckpointManager(tmp_path)
    assert manager.select(True) is None and manager.select(False) is None
    for step in (1, 2, 3):
        manager.save(step, {"step": step}, Config(), write_shards)
    assert manager.select(True) == manager.select("latest") == tmp_path / "step_00000003"
    assert manager.select(2) == manager.select("step_00000002") == tmp_path / "step_00000002"
    with pytest.raises(ValueError, match=r"trainer.resume=5: .* holds no complete checkpoint of step 5 \(steps with "
                                         r"one: 1, 2, 3\)"):
        manager.select(5)
    with pytest.raises(ValueError, match="trainer.resume is false but .* holds checkpoints"):
        manager.select(False)
    for bad in (0, -1, "step_2", "yes"):
        with pytest.raises(ValueError, match="trainer.resume must be true"):
            resume_target(bad)
    moved = manager.set_aside_after(1)
    assert [step for step, _ in manager.complete()] == [1]
    assert sorted(p.name.split(".")[0] for p in moved) == ["step_00000002", "step_00000003"]
    assert all(p.is_dir() and ".superseded-" in p.name for p in moved)  # kept, under a name that is no checkpoint
    assert manager.save(2, {"step": 2}, Config(), write_shards) == tmp_path / "step_00000002"


def prompts(count: int) -> list[Prompt]:
    return [Prompt(f"set/{i}", (), f"question {i}", "A", "src") for i in range(count)]


def test_sampler_resumes_exactly_where_it_stopped():
    data = prompts(5)
    uninterrupted = PromptSampler(data, seed=3)
    expected = [p.uid for _ in range(4) for p in uninterrupted.next(3)]  # crosses two epoch boundaries
    first = PromptSampler(data, seed=3)
    seen = [p.uid for _ in range(2) for p in first.next(3)]
    resumed = PromptSampler(data, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    seen += [p.uid for _ in range(2) for p in resumed.next(3)]
    assert seen == expected
    assert sorted(expected[:5]) == sorted(p.uid for p in data)  # each epoch is a permutation
    assert expected[:5] != expected[5:10]  # and a new one every epoch
    with pytest.raises(ValueError, match="refers to 5 training prompts"):
        PromptSampler(prompts(6), seed=3).load_state_dict(first.state_dict())


def test_sampler_peek_hands_out_nothing():
    sampler, reference = PromptSampler(prompts(5), seed=3), PromptSampler(prompts(5), seed=3)
    sampler.next(4)
    reference.next(4)
    ahead = [p.uid for p in sampler.peek(3)]  # crosses the epoch boundary
    assert sampler.state_dict() == reference.state_dict()
    assert [p.uid for p in sampler.next(3)] == ahead == [p.uid for p in reference.next(3)]


def test_collect_rounds_offers_the_next_round_and_advances_only_for_rounds_asked_for():
    """The driver's round loop: with overlap each round is offered the next one's prompts (not after the last round
    allowed); the sampler and the kept groups end where they do without overlap."""
    from megatron_minio3.trainer.step_plan import GroupSummary, RoundSummary, collect_rounds

    def run(overlap: bool, max_rounds: int):
        sampler, calls = PromptSampler(prompts(7), seed=1), []

        def generate_round(round_prompts, round_index, next_prompts):
            calls.append(([p.uid for p in round_prompts], round_index, next_prompts and [p.uid for p in next_prompts]))
            keep = round_index % 2 == 1  # every other round's groups have a learning signal
            return [RoundSummary([GroupSummary(0, round_index * 2 + i, p.uid, (), keep, "" if keep else "no_reward_spread")
                                  for i, p in enumerate(round_prompts)], [], 1.0)]

        collection = collect_rounds(generate_round, sampler, 4, max_rounds, 2, overlap)
        return collection, sampler.state_dict(), calls

    plain, overlapped = run(False, 8), run(True, 8)
    assert [g.uid for g in overlapped[0].kept] == [g.uid for g in plain[0].kept] and len(plain[0].kept) == 4
    assert overlapped[1] == plain[1] and overlapped[0].num_rounds == plain[0].num_rounds == 4
    assert [c[:2] for c in overlapped[2]] == [c[:2] for c in plain[2]]
    assert all(c[2] is None for c in plain[2])
    rounds = overlapped[2]
    assert all(rounds[i][2] == rounds[i + 1][0] for i in range(len(rounds) - 1))  # the next round offered is the one run
    assert rounds[-1][2] is not None  # offered, not asked for: the handles drop it
    _, _, capped = run(True, 3)  # the last round allowed is offered nothing
    assert [c[2] is None for c in capped] == [False, False, True]


def trajectory(uid: str, sample_index: int) -> Trajectory:
    return Trajectory(
        uid=uid, sample_index=sample_index, data_source="src", question="q", ground_truth="A", verifier=None,
        prompt_length=2, token_ids=[1, 2, 3], loss_mask=[0, 0, 1], rollout_logprobs=[0.0, 0.0, -1.0],
        attention_length=3, images=[], turns=[TurnRecord(1, "stop", False)], turn_texts=["<answer>A</answer>"],
        exceed=False, void=False, truncated=False, end_reason="answer",
    )


def test_groups_and_dynamic_sampling():
    # "c" twice in a row: a prompt handed out twice in one round (dataset smaller than the batch)
    samples = [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1), ("b", 2), ("c", 0), ("c", 1), ("c", 2),
               ("c", 0), ("c", 1)]
    scores = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, float("nan"), 1.0, 0.0, 0.0]
    results = [RewardResult(s, failed=s != s) for s in scores]
    groups = group_by_prompt([trajectory(uid, index) for uid, index in samples], results)
    assert [len(g.trajectories) for g in groups] == [3, 3, 3, 2]
    drop = [r.failed for r in results]
    assert groups_to_keep(groups, drop, AlgorithmConfig()) == [True, False, False, False]  # spread, flat, failed, flat
    no_filter = AlgorithmConfig(dynamic_sampling=False)
    assert groups_to_keep(groups, drop, no_filter) == [True, True, False, True]  # reward failures always drop
    with pytest.raises(ValueError, match="2 trajectories but 1 reward results"):
        group_by_prompt([trajectory("a", 0), trajectory("a", 1)], results[:1])


def test_metrics_logger_keeps_records_up_to_the_resumed_step_and_summarises(tmp_path):
    cfg = Config()
    cfg.trainer.loggers = ["jsonl"]
    logger = MetricsLogger(cfg, tmp_path, resume_step=0)
    logger.log_event("probe", 0, {"probe/mean_abs_logprob_diff": 1e-7, "probe/max_abs_logprob_diff": 1e-6})
    timer = PhaseTimer()
    with timer("generate"):
        pass
    for step in (1, 2, 3):
        logger.log(step, {"reward/mean": 0.1 * step, "reward/src/mean": 0.1 * step, "actor/num_updates": 2.0,
                          "actor/loss": float("nan"), **timer.metrics()})
    MetricsLogger(cfg, tmp_path, resume_step=2)  # a run resuming from the step-2 checkpoint
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r.get("event"), r["step"]) for r in records] == [("probe", 0), (None, 1), (None, 2)]
    assert records[1]["actor/loss"] is None and records[1]["timing/generate_s"] >= 0
    text = "\n".join(summary_lines(records, tmp_path / "metrics.jsonl", None))
    assert "reward per step:   0.100 0.200" in text and "src: reward 0.100 (step 1) -> 0.200 (step 2)" in text
    assert "4 optimizer steps" in text and "<= 1.00e-07 over 1 probe(s)" in text
