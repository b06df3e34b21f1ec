"""RewardManager: routing, weighted terms, failure semantics, metrics, config validation, registry."""
from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from megatron_minio3.config.reward import IoUConfig, RewardConfig
from megatron_minio3.rewards import verifiers as verifiers_module
from megatron_minio3.rewards.manager import RewardManager, reward_metrics_by_source, validate_reward_config
from megatron_minio3.rewards.types import RewardInput, RewardResult, Verdict
from megatron_minio3.rewards.verifiers import register_verifier

THINK = "<think>t</think>"
GROUND = '<grounding>{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}</grounding>'


def rule_cfg(**overrides) -> RewardConfig:
    mapping = {"vstar": "mc", "count": "exact", "geo": "math", "ref": "iou"}
    base = RewardConfig(verifiers=mapping, default_verifier="exact")
    return dataclasses.replace(base, **overrides)


def inp(uid: str, source: str, truth: str, answer: str | None, tool_calls: int = 0, **kw) -> RewardInput:
    turns = [f"{THINK}{GROUND}"] * tool_calls + [THINK + ("" if answer is None else f"<answer>{answer}</answer>")]
    return RewardInput(uid, source, "question?", truth, turns, num_tool_calls=tool_calls, **kw)


def test_routes_by_data_source_default_and_sample_override() -> None:
    manager = RewardManager(rule_cfg())
    samples = [
        inp("mc", "vstar", "B", "(B) red"),
        inp("exact", "count", "3", "three"),
        inp("math", "geo", "\\frac{1}{2}", "0.5"),
        inp("iou", "ref", "[0, 0, 10, 10]", "[0, 0, 10, 10]"),
        inp("default", "unmapped", "red car", "The red car."),
        inp("override", "vstar", "1/2", "0.5", verifier="math"),
    ]
    assert [manager.verifier_name(s) for s in samples] == ["mc", "exact", "math", "iou", "exact", "math"]
    results = manager.score_sync(samples, validation=False)
    assert [r.score for r in results] == [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert all(not r.failed and r.error is None for r in results)
    assert results[3].metrics["iou"] == 1.0


def test_unmapped_source_without_default_and_unknown_verifier_are_errors() -> None:
    manager = RewardManager(rule_cfg(default_verifier=""))
    with pytest.raises(ValueError, match="'unmapped'.*reward.default_verifier"):
        manager.score_sync([inp("u", "unmapped", "x", "x")], validation=True)
    with pytest.raises(ValueError, match="'nope'"):
        manager.score_sync([inp("u", "vstar", "B", "B", verifier="nope")], validation=True)


def test_weighted_terms() -> None:
    cfg = rule_cfg(
        accuracy_weight=0.8, format_weight=0.2, tool_call_penalty=0.05, tool_error_penalty=0.1, tool_use_bonus=0.5
    )
    manager = RewardManager(cfg)
    correct_with_tools = inp("a", "vstar", "B", "B", tool_calls=2, num_tool_errors=1)
    wrong_with_tools = inp("b", "vstar", "B", "C", tool_calls=1)
    correct_badly_formatted = RewardInput("c", "vstar", "q", "B", ["<answer>B</answer>"])
    a, b, c = manager.score_sync([correct_with_tools, wrong_with_tools, correct_badly_formatted], validation=False)
    assert a.score == pytest.approx(0.8 + 0.2 - 2 * 0.05 - 0.1 + 0.5)
    assert b.score == pytest.approx(0.2 - 0.05)  # no bonus without a correct answer
    assert c.score == pytest.approx(0.8)
    assert (a.metrics["format"], c.metrics["format"]) == (1.0, 0.0)
    assert (a.metrics["num_tool_calls"], a.metrics["num_tool_errors"]) == (2.0, 1.0)


def test_tool_terms_ours_and_original_by_hand() -> None:
    weights = dict(accuracy_weight=1.0, format_weight=0.5, tool_call_penalty=0.2, tool_use_bonus=0.3)
    samples = [
        inp("right_3_calls", "vstar", "B", "B", tool_calls=3),  # well formatted
        inp("wrong_1_call", "vstar", "B", "C", tool_calls=1),
        inp("right_no_call", "vstar", "B", "B"),
        inp("right_1_call_1_error", "vstar", "B", "B", tool_calls=1, num_tool_errors=1),
    ]
    ours = RewardManager(rule_cfg(**weights, tool_error_penalty=0.1)).score_sync(samples, validation=False)
    original = RewardManager(rule_cfg(**weights, tool_error_penalty=0.1, tool_terms="original")).score_sync(
        samples, validation=False
    )
    # ours: 1*acc + 0.5*format - 0.2*calls - 0.1*errors + 0.3*[calls and correct]
    assert [r.score for r in ours] == pytest.approx([1 + 0.5 - 0.6 + 0.3, 0.5 - 0.2, 1 + 0.5, 1 + 0.5 - 0.2 - 0.1 + 0.3])
    # original: (1 - 0.2*[calls]) * 1*acc + 0.5*format + 0.3*[calls] - 0.1*errors
    assert [r.score for r in original] == pytest.approx([0.8 + 0.5 + 0.3, 0.5 + 0.3, 1 + 0.5, 0.8 + 0.5 + 0.3 - 0.1])


def test_tool_terms_original_scales_the_weighted_verifier_score() -> None:
    cfg = rule_cfg(tool_terms="original", accuracy_weight=2.0, tool_call_penalty=0.25, tool_use_bonus=0.0)
    (box,) = RewardManager(cfg).score_sync([inp("iou", "ref", "[0, 0, 10, 10]", "[0, 0, 10, 9]", tool_calls=2)],
                                           validation=False)
    assert box.score == pytest.approx(0.75 * 2.0 * 0.9)  # the IoU 0.9 is the verifier score


def test_tool_terms_are_checked() -> None:
    with pytest.raises(ValueError, match="reward.tool_call_penalty must lie in"):
        validate_reward_config(rule_cfg(tool_terms="original", tool_call_penalty=1.5))
    validate_reward_config(rule_cfg(tool_terms="ours", tool_call_penalty=1.5))  # per call in ours: any size
    with pytest.raises(ValueError, match="reward.tool_terms must be one of"):
        validate_reward_config(rule_cfg(tool_terms="seed"))
    from megatron_minio3.config import load_config

    assert load_config(None, ["reward.tool_terms=original"]).reward.tool_terms == "original"
    with pytest.raises(ValueError, match="reward.tool_terms"):
        load_config(None, ["reward.tool_terms=seed"])


def test_recipe_defaults_score_accuracy_only() -> None:
    manager = RewardManager(rule_cfg())
    (result,) = manager.score_sync([inp("a", "vstar", "B", "B", tool_calls=3, num_tool_errors=2)], validation=False)
    assert result.score == 1.0


def test_iou_schedule_uses_the_training_step() -> None:
    manager = RewardManager(rule_cfg(iou=IoUConfig(schedule="dynamic")))
    sample = inp("a", "ref", "[0, 0, 10, 10]", "[0, 0, 10, 9]")  # IoU 0.9
    early = manager.score_sync([sample], validation=False, step=5, total_steps=100)[0]
    late = manager.score_sync([sample], validation=False, step=30, total_steps=100)[0]
    assert early.score == pytest.approx(0.9) and early.metrics["iou_threshold"] == 0.85
    assert late.score == 0.0 and late.metrics["iou_threshold"] == 0.99


def test_failures_are_nan_in_training_zero_in_validation_and_counted() -> None:
    samples = [inp("ok", "vstar", "B", "B"), inp("bad", "ref", "not a box", "[0, 0, 1, 1]")]
    manager = RewardManager(rule_cfg())
    training = manager.score_sync(samples, validation=False)
    assert training[0].score == 1.0 and not training[0].failed
    assert training[1].failed and math.isnan(training[1].score) and "ground truth" in training[1].error
    assert training[1].metrics["accuracy"] == 0.0
    assert manager.drop_mask(training, validation=False) == [False, True]

    validation = manager.score_sync(samples, validation=True)
    assert validation[1].failed and validation[1].score == 0.0
    assert manager.drop_mask(validation, validation=True) == [False, False]

    keeping = RewardManager(rule_cfg(drop_failed_groups=False))
    kept = keeping.score_sync(samples, validation=False)
    assert kept[1].failed and kept[1].score == 0.0
    assert keeping.drop_mask(kept, validation=False) == [False, False]


def test_a_raising_verifier_is_a_failed_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(inp: RewardInput, ctx) -> Verdict:
        raise RuntimeError("boom")

    monkeypatch.setitem(verifiers_module.VERIFIER_FACTORIES, "broken", lambda cfg: broken)
    manager = RewardManager(rule_cfg(verifiers={"x": "broken"}))
    (result,) = manager.score_sync([inp("a", "x", "B", "B")], validation=True)
    assert result.failed and result.score == 0.0 and "RuntimeError: boom" in result.error


def test_registered_async_verifier() -> None:
    async def length_reward(inp: RewardInput, ctx) -> Verdict:
        await asyncio.sleep(0)
        value = min(1.0, len(inp.turns[-1]) / 100) * (ctx.step + 1)
        return Verdict(score=value, accuracy=1.0, metrics={"chars": float(len(inp.turns[-1]))})

    register_verifier("length", lambda cfg: length_reward)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_verifier("length", lambda cfg: length_reward)
        manager = RewardManager(rule_cfg(verifiers={"essay": "length"}))
        sample = RewardInput("a", "essay", "q", "-", ["x" * 50])
        (result,) = manager.score_sync([sample], validation=False, step=1, total_steps=4)
        assert result.score == pytest.approx(1.0) and result.metrics["chars"] == 50.0
    finally:
        verifiers_module.VERIFIER_FACTORIES.pop("length")


def test_bad_step_and_inputs_are_errors() -> None:
    manager = RewardManager(rule_cfg())
    with pytest.raises(ValueError, match="total_steps"):
        manager.score_sync([], validation=False, step=0, total_steps=0)
    with pytest.raises(ValueError, match="step"):
        manager.score_sync([], validation=False, step=-1)
    with pytest.raises(ValueError, match="num_tool_calls"):
        manager.score_sync([inp("a", "vstar", "B", "B", tool_calls=0, num_tool_errors=-1)], validation=False)
    with pytest.raises(ValueError, match="turns"):
        manager.score_sync([RewardInput("a", "vstar", "q", "B", "<answer>B</answer>")], validation=False)
    assert manager.score_sync([], validation=False) == []


def test_metrics_by_source() -> None:
    samples = [
        inp("a", "vstar", "B", "B"),
        inp("b", "vstar", "B", "C"),
        inp("c", "vstar", "B", None),
        inp("d", "ref", "[0, 0, 10, 10]", "[0, 0, 10, 9]"),
        inp("e", "ref", "bad truth", "[0, 0, 1, 1]"),
    ]
    manager = RewardManager(rule_cfg())
    metrics = reward_metrics_by_source(samples, manager.score_sync(samples, validation=True))
    assert metrics["reward/vstar/mean"] == pytest.approx(1 / 3)
    assert metrics["reward/vstar/accuracy"] == pytest.approx(1 / 3)
    assert metrics["reward/vstar/num_failed"] == 0.0 and metrics["reward/vstar/num_samples"] == 3.0
    assert metrics["reward/vstar/format"] == pytest.approx(2 / 3)
    assert metrics["reward/ref/mean"] == pytest.approx(0.45)  # 0.9 and a failure scored 0
    assert metrics["reward/ref/accuracy"] == pytest.approx(0.5)
    assert metrics["reward/ref/num_failed"] == 1.0
    assert metrics["reward/mean"] == pytest.approx((1 + 0.9) / 5)
    assert metrics["reward/num_failed"] == 1.0 and metrics["reward/num_samples"] == 5.0

    training = reward_metrics_by_source(samples, manager.score_sync(samples, validation=False))
    assert training["reward/ref/mean"] == pytest.approx(0.9)  # the NaN (dropped group) is left out
    assert training["reward/ref/num_failed"] == 1.0

    only_failed = [RewardResult(math.nan, True, {}, "x")]
    assert reward_metrics_by_source(samples[:1], only_failed) == {
        "reward/vstar/num_samples": 1.0,
        "reward/vstar/num_failed": 1.0,
        "reward/vstar/format": 0.0,
        "reward/num_samples": 1.0,
        "reward/num_failed": 1.0,
        "reward/format": 0.0,
    }
    with pytest.raises(ValueError, match="2 inputs but 1 results"):
        reward_metrics_by_source(samples[:2], only_failed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"verifiers": {"vstar": "mcq"}}, r"reward.verifiers\['vstar'\] = 'mcq'"),
        ({"default_verifier": "llm"}, "reward.default_verifier"),
        ({"format_weight": math.nan}, "reward.format_weight"),
        ({"iou": IoUConfig(threshold=1.5)}, "reward.iou.threshold"),
        ({"iou": IoUConfig(schedule="cosine")}, "reward.iou.schedule"),
        ({"iou": IoUConfig(schedule="dynamic", dynamic_thresholds=[0.9])}, "one more entry"),
        ({"iou": IoUConfig(schedule="dynamic", dynamic_boundaries=[0.5, 0.2])}, "dynamic_boundaries"),
        ({"iou": IoUConfig(schedule="dynamic", dynamic_thresholds=[0.8, 0.9, 1.2])}, "dynamic_thresholds"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_reward_config(rule_cfg(**overrides))


def test_judge_config_checked_only_when_the_judge_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_minio3.config.reward import JudgeConfig, RemoteRewardConfig

    bad_judge = JudgeConfig(max_concurrency=0)
    validate_reward_config(rule_cfg(judge=bad_judge))
    with pytest.raises(ValueError, match="reward.judge.max_concurrency"):
        validate_reward_config(rule_cfg(verifiers={"vp": "judge"}, judge=bad_judge))
    monkeypatch.delenv("MINIO3_ABSENT_KEY", raising=False)
    with pytest.raises(ValueError, match="MINIO3_ABSENT_KEY"):  # a missing key fails at construction
        RewardManager(rule_cfg(default_verifier="judge", judge=JudgeConfig(api_key_env="MINIO3_ABSENT_KEY")))
    with pytest.raises(ValueError, match="reward.remote.urls"):
        validate_reward_config(rule_cfg(remote=RemoteRewardConfig(urls=["localhost:8700"])))


def test_the_config_loader_runs_the_reward_checks() -> None:
    from megatron_minio3.config import load_config

    cfg = load_config(None, ["reward.verifiers={vstar: mc}", "reward.iou.schedule=dynamic"])
    assert cfg.reward.verifiers == {"vstar": "mc"} and cfg.reward.iou.schedule == "dynamic"
    # verifier names are checked against the registry (register_verifier may add some) when the manager is built,
    # which every entry point does before any worker starts; config/ imports nothing of the rewards package
    unknown = load_config(None, ["reward.default_verifier=llm"])
    with pytest.raises(ValueError, match="reward.default_verifier = 'llm'"):
        RewardManager(unknown.reward)
    with pytest.raises(ValueError, match="reward.judge.max_concurrency"):  # the judge's values are checked on load
        load_config(None, ["reward.default_verifier=judge", "reward.judge.max_concurrency=0"])
    with pytest.raises(ValueError, match="reward.iou.dynamic_thresholds"):
        load_config(None, ["reward.iou.schedule=dynamic", "reward.iou.dynamic_thresholds=[0.9]"])


def test_split_evenly() -> None:
    from megatron_minio3.rewards.client import split_evenly

    assert split_evenly(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_evenly(2, 4) == [(0, 1), (1, 2)]  # no empty chunks
    assert split_evenly(0, 3) == []
    assert split_evenly(5, 1) == [(0, 5)]


# ---------------------------------------------------------------- time limit, sizes (issue 15)

# math-verify on this runs for about 8 s in-process (its own 5 s SIGALRM cannot interrupt the big power).
EXPLODING_MATH = "2^{2^{2^{2^{100}}}}"


def test_a_verifier_past_the_time_limit_fails_its_sample_and_the_rest_are_scored() -> None:
    import time

    manager = RewardManager(rule_cfg(verifier_timeout_s=1.0))
    samples = [inp("slow", "geo", "2", EXPLODING_MATH), inp("ok", "geo", "\\frac{1}{2}", "0.5"),
               inp("mc", "vstar", "B", "B")]
    manager.score_sync(samples[1:], validation=True)  # workers started and warm: the limit measures the scoring
    started = time.perf_counter()
    slow, ok, mc = manager.score_sync(samples, validation=False)
    elapsed = time.perf_counter() - started
    assert slow.failed and math.isnan(slow.score)
    assert "math: no verdict within reward.verifier_timeout_s=1 s" in slow.error
    assert not ok.failed and ok.score == 1.0 and not mc.failed and mc.score == 1.0
    assert elapsed < 4.0, elapsed  # stopped at the limit, not after math-verify's own 5 s (or never)
    (again,) = manager.score_sync([samples[1]], validation=True)  # the killed worker was replaced
    assert again.score == 1.0


def test_verifier_limits_are_checked() -> None:
    from megatron_minio3.config.reward import RemoteRewardConfig

    for overrides, message in [
        ({"verifier_timeout_s": -1.0}, "reward.verifier_timeout_s"),
        ({"verifier_workers": 0}, "reward.verifier_workers"),
        ({"remote": RemoteRewardConfig(max_request_bytes=10)}, "reward.remote.max_request_bytes"),
    ]:
        with pytest.raises(ValueError, match=message):
            validate_reward_config(rule_cfg(**overrides))


def test_without_a_time_limit_verifiers_run_in_process() -> None:
    manager = RewardManager(rule_cfg(verifier_timeout_s=0.0))
    (result,) = manager.score_sync([inp("a", "vstar", "B", "(B) red")], validation=True)
    assert result.score == 1.0 and manager._isolated == {"mc": False}


def test_split_by_size() -> None:
    from megatron_minio3.rewards.client import split_by_size

    assert split_by_size([10, 10, 10, 10], 25) == [(0, 2), (2, 4)]  # 10 + 1 separator each
    assert split_by_size([10, 100, 10], 25) == [(0, 1), (1, 2), (2, 3)]  # the oversized one alone
    assert split_by_size([5] * 3, 1000) == [(0, 3)]
    assert split_by_size([], 10) == []
