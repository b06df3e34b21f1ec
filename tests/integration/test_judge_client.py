"""JudgeClient and RewardManager against a fake chat API served over real HTTP on 127.0.0.1."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time

import pytest

from megatron_minio3.config.reward import JudgeConfig, RewardConfig
from megatron_minio3.rewards.judge import JudgeClient
from megatron_minio3.rewards.manager import RewardManager, reward_metrics_by_source
from megatron_minio3.rewards.types import RewardInput
from tests.integration.test_judge_fake import FakeJudge, Reply, fake_judge, score_by_prediction  # noqa: F401  (fixture)

KEY_ENV = "MINIO3_TEST_JUDGE_KEY"
SECRET = "sk-test-9f8e7d6c5b4a-secret"


@pytest.fixture(autouse=True)
def judge_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)


def judge_cfg(judge: FakeJudge, **overrides) -> JudgeConfig:
    base = JudgeConfig(
        base_url=judge.base_url,
        model="fake-judge-1",
        api_key_env=KEY_ENV,
        max_concurrency=8,
        timeout_s=2.0,
        max_retries=3,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    return dataclasses.replace(base, **overrides)


def sample(uid: str, prediction: str | None, truth: str = "red", source: str = "visualprobe") -> RewardInput:
    final = "<think>looked</think>" + ("" if prediction is None else f"<answer>{prediction}</answer>")
    return RewardInput(uid, source, "<image>\nWhat colour is the car?", truth, [final])


def judge_once(client: JudgeClient, inp: RewardInput):
    async def run():
        try:
            return await client(inp)
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_success_sends_the_chat_request_and_reads_the_score(fake_judge: FakeJudge) -> None:
    fake_judge.reset(score_by_prediction({"red"}))
    client = JudgeClient(judge_cfg(fake_judge))
    right = judge_once(client, sample("a", "red"))
    wrong = judge_once(client, sample("b", "blue"))
    assert (right.score, right.accuracy, right.failed) == (1.0, 1.0, False)
    assert (wrong.score, wrong.failed) == (0.0, False)
    assert right.metrics["judge_attempts"] == 1.0
    body = fake_judge.bodies[0]
    assert body["model"] == "fake-judge-1" and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    user = body["messages"][1]["content"]
    assert "Question: What colour is the car?" in user and "<image>" not in user
    assert "Reference answer: red" in user and "Model prediction: red" in user
    assert fake_judge.auth_headers == [f"Bearer {SECRET}"] * 2


def test_judges_the_first_answer_span_over_all_turns(fake_judge: FakeJudge) -> None:
    fake_judge.reset(score_by_prediction({"red"}))
    turns = ["<think>a</think><answer>red</answer><grounding>{}</grounding>", "<think>b</think><answer>blue</answer>"]
    verdict = judge_once(JudgeClient(judge_cfg(fake_judge)), RewardInput("u", "s", "q", "red", turns))
    assert verdict.score == 1.0
    assert "Model prediction: red" in fake_judge.bodies[0]["messages"][1]["content"]


@pytest.mark.parametrize("prediction", [None, "", "   "])
def test_no_or_empty_answer_scores_zero_without_a_call(fake_judge: FakeJudge, prediction: str | None) -> None:
    fake_judge.reset(score_by_prediction({"red"}))
    verdict = judge_once(JudgeClient(judge_cfg(fake_judge)), sample("a", prediction))
    assert (verdict.score, verdict.failed) == (0.0, False)
    assert verdict.metrics["has_answer"] == (0.0 if prediction is None else 1.0)
    assert fake_judge.num_requests == 0


def test_cache_and_in_flight_sharing_make_one_call_per_triple(fake_judge: FakeJudge) -> None:
    fake_judge.reset(lambda i, body, user: Reply.chat("Score: 1", delay_s=0.2))
    client = JudgeClient(judge_cfg(fake_judge))

    async def run():
        concurrent = await asyncio.gather(*(client(sample(str(i), "red")) for i in range(16)))
        later = await client(sample("late", "red"))
        await client.aclose()
        return concurrent, later

    concurrent, later = asyncio.run(run())
    assert fake_judge.num_requests == 1
    assert all(v.score == 1.0 for v in concurrent)
    assert sum(v.metrics["judge_cache_hit"] for v in concurrent) == 15
    assert later.metrics["judge_cache_hit"] == 1.0 and later.metrics["judge_attempts"] == 0.0
    # a different question is a different key
    judge_once(client, RewardInput("q2", "s", "Which car?", "red", ["<answer>red</answer>"]))
    assert fake_judge.num_requests == 2


def test_slow_replies_past_the_timeout_fail_after_retries(fake_judge: FakeJudge) -> None:
    fake_judge.reset(lambda i, body, user: Reply.chat("Score: 1", delay_s=1.0))
    client = JudgeClient(judge_cfg(fake_judge, timeout_s=0.2, max_retries=1))
    start = time.monotonic()
    verdict = judge_once(client, sample("a", "red"))
    elapsed = time.monotonic() - start
    assert verdict.failed and verdict.score == 0.0
    assert "no reply within 0.2 s" in verdict.error and "2 attempts" in verdict.error
    assert fake_judge.num_requests == 2
    assert elapsed < 1.8  # two 0.2 s timeouts and a short backoff; waiting for the server takes >= 2 s


def test_slow_then_fast_succeeds_on_retry(fake_judge: FakeJudge) -> None:
    fake_judge.reset(lambda i, body, user: Reply.chat("Score: 1", delay_s=1.0 if i == 0 else 0.0))
    verdict = judge_once(JudgeClient(judge_cfg(fake_judge, timeout_s=0.2)), sample("a", "red"))
    assert (verdict.score, verdict.failed, verdict.metrics["judge_attempts"]) == (1.0, False, 2.0)


def test_server_errors_then_success(fake_judge: FakeJudge) -> None:
    def script(index: int, body: dict, user: str) -> Reply:
        if index == 0:
            return Reply(500, '{"error": "internal"}')
        if index == 1:
            return Reply(503, "unavailable")
        if index == 2:
            return Reply(429, '{"error": "rate limited"}', headers={"Retry-After": "0.05"})
        return Reply.chat("Score: 1")

    fake_judge.reset(script)
    verdict = judge_once(JudgeClient(judge_cfg(fake_judge, max_retries=3)), sample("a", "red"))
    assert (verdict.score, verdict.failed, verdict.metrics["judge_attempts"]) == (1.0, False, 4.0)
    assert fake_judge.num_requests == 4


MALFORMED = [
    Reply(200, "this is not json"),
    Reply(200, json.dumps({"id": "x"})),  # no choices
    Reply(200, json.dumps({"choices": []})),
    Reply(200, json.dumps({"choices": [{"message": {"content": None}}]})),
    Reply.chat("The prediction looks right to me."),  # no verdict
    Reply.chat("Score: 0\nOn reflection, Score: 1"),  # two verdicts
    Reply.chat("Score: 7"),
]


def test_malformed_replies_are_retried_then_succeed(fake_judge: FakeJudge) -> None:
    fake_judge.reset(lambda i, body, user: MALFORMED[i] if i < len(MALFORMED) else Reply.chat("**Score:** 0"))
    verdict = judge_once(JudgeClient(judge_cfg(fake_judge, max_retries=len(MALFORMED))), sample("a", "red"))
    assert (verdict.score, verdict.failed) == (0.0, False)
    assert verdict.metrics["judge_attempts"] == len(MALFORMED) + 1


@pytest.mark.parametrize("reply", MALFORMED, ids=range(len(MALFORMED)))
def test_always_malformed_fails(fake_judge: FakeJudge, reply: Reply) -> None:
    fake_judge.reset(lambda i, body, user: reply)
    verdict = judge_once(JudgeClient(judge_cfg(fake_judge, max_retries=1)), sample("a", "red"))
    assert verdict.failed and verdict.score == 0.0
    assert "malformed reply" in verdict.error or "no 'Score: 0/1' verdict" in verdict.error
    assert fake_judge.num_requests == 2


def test_client_errors_are_not_retried_and_the_key_never_leaks(
    fake_judge: FakeJudge, caplog: pytest.LogCaptureFixture
) -> None:
    # A hostile or buggy endpoint echoing the Authorization header back in its error body.
    fake_judge.reset(lambda i, body, user: Reply(401, json.dumps({"error": "bad key", "got": f"Bearer {SECRET}"})))
    caplog.set_level(logging.DEBUG)
    client = JudgeClient(judge_cfg(fake_judge))
    verdict = judge_once(client, sample("a", "red"))
    assert verdict.failed and "HTTP 401" in verdict.error
    assert fake_judge.num_requests == 1
    assert SECRET not in verdict.error and "***" in verdict.error
    assert SECRET not in repr(client)
    assert SECRET not in caplog.text


def test_unreachable_judge_fails(fake_judge: FakeJudge) -> None:
    cfg = judge_cfg(fake_judge, base_url="http://127.0.0.1:9/v1", max_retries=1)  # port 9: nothing listens
    verdict = judge_once(JudgeClient(cfg), sample("a", "red"))
    assert verdict.failed and "ConnectError" in verdict.error


def test_permanent_failure_through_the_manager(fake_judge: FakeJudge, caplog: pytest.LogCaptureFixture) -> None:
    fake_judge.reset(lambda i, body, user: Reply(500, "down") if "blue" in user else Reply.chat("Score: 1"))
    cfg = RewardConfig(verifiers={"vstar": "mc"}, default_verifier="judge", judge=judge_cfg(fake_judge, max_retries=2))
    manager = RewardManager(cfg)
    inputs = [sample("ok", "red"), sample("bad", "blue"), sample("mc", "(B)", truth="B", source="vstar")]

    with caplog.at_level(logging.WARNING):
        training = manager.score_sync(inputs, validation=False)
    assert [r.failed for r in training] == [False, True, False]
    assert training[0].score == 1.0 and math.isnan(training[1].score) and training[2].score == 1.0
    assert "3 attempts" in training[1].error and "HTTP 500" in training[1].error
    assert manager.drop_mask(training, validation=False) == [False, True, False]
    assert "1 of 3 samples failed" in caplog.text and "'bad'" in caplog.text
    assert fake_judge.num_requests == 1 + 3  # the success is cached across calls below

    validation = manager.score_sync(inputs, validation=True)
    assert [r.score for r in validation] == [1.0, 0.0, 1.0] and validation[1].failed
    metrics = reward_metrics_by_source(inputs, validation)
    assert metrics["reward/visualprobe/num_failed"] == 1.0
    assert metrics["reward/visualprobe/mean"] == 0.5
    assert metrics["reward/vstar/accuracy"] == 1.0

    keeping = RewardManager(dataclasses.replace(cfg, drop_failed_groups=False))
    kept = keeping.score_sync(inputs, validation=False)
    assert kept[1].score == 0.0 and kept[1].failed
    assert keeping.drop_mask(kept, validation=False) == [False, False, False]


def test_thousand_concurrent_requests_respect_the_limit(fake_judge: FakeJudge) -> None:
    fake_judge.reset(lambda i, body, user: Reply.chat("Score: 1" if i % 2 else "Score: 0", delay_s=0.01))
    # two pooled clients; a long timeout so that no request is abandoned (and retried) on a busy machine
    client = JudgeClient(judge_cfg(fake_judge, max_concurrency=24, timeout_s=60.0))
    inputs = [sample(str(i), f"answer {i}") for i in range(1000)]

    async def run():
        try:
            return await asyncio.gather(*(client(inp) for inp in inputs))
        finally:
            await client.aclose()

    start = time.monotonic()
    verdicts = asyncio.run(run())
    elapsed = time.monotonic() - start
    assert not any(v.failed for v in verdicts)
    assert sum(v.metrics["judge_attempts"] for v in verdicts) == 1000
    assert sum(v.score for v in verdicts) == 500
    assert fake_judge.num_requests == 1000
    assert fake_judge.max_in_flight == 24  # reached, never passed
    print(f"1000 judge requests, limit 24: {elapsed:.2f} s")
