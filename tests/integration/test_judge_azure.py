"""The judge on an Azure OpenAI deployment, against the fake's Azure route (real HTTP on 127.0.0.1), configured
from the environment as the seed is: API_KEY, API_VERSION, END_POINT."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from megatron_minio3.config.reward import AzureJudgeConfig, JudgeConfig, RewardConfig
from megatron_minio3.rewards.judge import JudgeClient
from megatron_minio3.rewards.manager import RewardManager
from megatron_minio3.rewards.types import RewardInput
from tests.integration.test_judge_fake import FakeJudge, Reply, fake_judge, score_by_prediction  # noqa: F401  (fixture)

SECRET = "azure-test-key-5c4b3a29"
VERSION = "2024-10-21"
DEPLOYMENT = "judge-gpt4o"
PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions"


@pytest.fixture
def azure_env(fake_judge: FakeJudge, monkeypatch: pytest.MonkeyPatch) -> FakeJudge:
    """The seed's three variables, pointing at the fake, which serves DEPLOYMENT at VERSION with SECRET."""
    monkeypatch.setenv("API_KEY", SECRET)
    monkeypatch.setenv("API_VERSION", VERSION)
    monkeypatch.setenv("END_POINT", fake_judge.endpoint)
    fake_judge.reset(score_by_prediction({"red"}))
    fake_judge.azure(DEPLOYMENT, VERSION, SECRET)
    return fake_judge


def azure_cfg(**overrides) -> JudgeConfig:
    base = JudgeConfig(
        provider="azure",
        api_key_env="API_KEY",
        azure=AzureJudgeConfig(deployment=DEPLOYMENT),
        timeout_s=2.0,
        max_retries=2,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    return dataclasses.replace(base, **overrides)


def sample(uid: str, prediction: str) -> RewardInput:
    return RewardInput(uid, "visualprobe", "<image>\nWhat colour is the car?", "red",
                       [f"<think>looked</think><answer>{prediction}</answer>"])


def judge_all(client: JudgeClient, inputs: list[RewardInput]):
    async def run():
        try:
            return await asyncio.gather(*(client(inp) for inp in inputs))
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_sends_the_azure_path_api_version_and_api_key_header(azure_env: FakeJudge) -> None:
    right, wrong = judge_all(JudgeClient(azure_cfg()), [sample("a", "red"), sample("b", "blue")])
    assert (right.score, right.failed, wrong.score, wrong.failed) == (1.0, False, 0.0, False)
    assert azure_env.seen == [
        {"path": PATH, "query": [("api-version", VERSION)], "api_key": SECRET, "authorization": None}
    ] * 2
    for body in azure_env.bodies:  # the same chat-completions body as the OpenAI path
        assert body["model"] == "gpt-4o-2024-08-06" and [m["role"] for m in body["messages"]] == ["system", "user"]
    users = sorted(body["messages"][1]["content"] for body in azure_env.bodies)
    assert "Model prediction: blue" in users[0] and "Model prediction: red" in users[1]


def test_config_values_win_over_the_environment_and_the_deployment_defaults_to_the_model(
    azure_env: FakeJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("END_POINT", "http://127.0.0.1:9/")  # nothing listens there: must not be used
    monkeypatch.delenv("API_VERSION")
    azure_env.azure("gpt-4o-2024-11-20", "2025-01-01-preview", SECRET)
    cfg = azure_cfg(
        model="gpt-4o-2024-11-20",
        azure=AzureJudgeConfig(endpoint=azure_env.endpoint.rstrip("/"), api_version="2025-01-01-preview"),
    )
    (verdict,) = judge_all(JudgeClient(cfg), [sample("a", "red")])
    assert (verdict.score, verdict.failed) == (1.0, False)
    assert azure_env.seen[0]["path"] == "/openai/deployments/gpt-4o-2024-11-20/chat/completions"
    assert azure_env.seen[0]["query"] == [("api-version", "2025-01-01-preview")]


def test_a_wrong_key_fails_at_once_naming_the_variable_not_the_key(
    azure_env: FakeJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_KEY", "not-the-key-123")
    (verdict,) = judge_all(JudgeClient(azure_cfg()), [sample("a", "red")])
    assert verdict.failed and verdict.metrics["judge_attempts"] == 1.0  # a 401 is not retried
    assert "HTTP 401" in verdict.error and "$API_KEY" in verdict.error and "api-key header" in verdict.error
    assert "not-the-key-123" not in verdict.error
    assert azure_env.seen[0]["api_key"] == "not-the-key-123"


@pytest.mark.parametrize("field, value", [("api_version", "2023-05-15"), ("deployment", "gpt-35")])
def test_a_wrong_api_version_or_deployment_is_a_404_that_says_what_to_check(
    azure_env: FakeJudge, field: str, value: str
) -> None:
    cfg = azure_cfg(azure=dataclasses.replace(AzureJudgeConfig(deployment=DEPLOYMENT), **{field: value}))
    (verdict,) = judge_all(JudgeClient(cfg), [sample("a", "red")])
    assert verdict.failed and verdict.metrics["judge_attempts"] == 1.0
    assert "HTTP 404" in verdict.error and "reward.judge.azure.deployment" in verdict.error and value in verdict.error


def test_the_openai_path_keeps_its_bearer_header(azure_env: FakeJudge, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIO3_TEST_OPENAI_KEY", "sk-openai-77")
    cfg = JudgeConfig(base_url=azure_env.base_url, api_key_env="MINIO3_TEST_OPENAI_KEY", timeout_s=2.0)
    (verdict,) = judge_all(JudgeClient(cfg), [sample("a", "red")])
    assert verdict.score == 1.0
    assert azure_env.seen == [
        {"path": "/v1/chat/completions", "query": [], "api_key": None, "authorization": "Bearer sk-openai-77"}
    ]


def test_the_reward_manager_scores_through_azure_and_fails_without_the_variables(
    azure_env: FakeJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = RewardConfig(default_verifier="judge", judge=azure_cfg())
    results = RewardManager(cfg).score_sync([sample("a", "red"), sample("b", "blue")], validation=True)
    assert [r.score for r in results] == [1.0, 0.0]
    for name in ("END_POINT", "API_VERSION", "API_KEY"):  # the pre-launch check names the missing variable
        with monkeypatch.context() as env:
            env.delenv(name)
            with pytest.raises(ValueError, match=f"'{name}' is not set"):
                RewardManager(cfg)


def test_a_seed_style_prompt_from_a_file_reaches_the_judge(azure_env: FakeJudge, tmp_path, monkeypatch) -> None:
    from megatron_minio3.config import load_config

    template = "Q: {question}\nTruth: {ground_truth}\nPred: {prediction}\nThe format should be \"Score: 0 or 1\"\n"
    (tmp_path / "judge_user.txt").write_text(template)
    (tmp_path / "judge_system.txt").write_text("You grade.\n")
    monkeypatch.chdir(tmp_path)  # prompt file paths are relative to the working directory
    azure_env.reset(lambda index, body, user: Reply.chat("Score: 1" if "Truth: red\nPred: red\n" in user else "0"))
    cfg = load_config(None, [
        "reward.judge.provider=azure", "reward.judge.api_key_env=API_KEY", f"reward.judge.azure.deployment={DEPLOYMENT}",
        "reward.judge.prompt_files={user_prompt_template: judge_user.txt, system_prompt: judge_system.txt}",
    ])
    assert cfg.reward.judge.prompt_files == {} and cfg.reward.judge.system_prompt == "You grade."
    (verdict,) = judge_all(JudgeClient(cfg.reward.judge), [sample("a", "red")])
    assert verdict.score == 1.0
    system, user = azure_env.bodies[0]["messages"]
    assert system["content"] == "You grade." and user["content"].startswith("Q: What colour is the car?\nTruth: red")
