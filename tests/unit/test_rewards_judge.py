"""Judge pieces that need no server: verdict parsing, config validation, key and Azure settings, extraction."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from megatron_minio3.config.reward import AzureJudgeConfig, JudgeConfig, read_prompt_files
from megatron_minio3.rewards.judge import JudgeClient, parse_judge_score, validate_judge_config
from megatron_minio3.rewards.types import RewardInput, Verdict


@pytest.mark.parametrize(
    "reply, score",
    [
        ("Score: 1", 1),
        ("Score: 0", 0),
        ("score:1", 1),
        ("SCORE = 0", 0),
        ("**Score:** 1", 1),
        ("Score：1", 1),  # fullwidth colon
        ("The prediction names the same colour.\nScore: 1", 1),
        ("Score: 1\nScore: 1", 1),
        (" 1 ", 1),
        ("0", 0),
        ("Score: 0 or 1", None),  # both values: no verdict
        ("Score: 0.5", None),
        ("Score: 10", None),
        ("Score: 2", None),
        ("I think it is correct", None),
        ("", None),
    ],
)
def test_parse_judge_score(reply: str, score: int | None) -> None:
    assert parse_judge_score(reply) == score


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("base_url", "api.openai.com/v1", "reward.judge.base_url"),
        ("model", "", "reward.judge.model"),
        ("max_concurrency", 0, "reward.judge.max_concurrency"),
        ("timeout_s", 0.0, "reward.judge.timeout_s"),
        ("max_retries", -1, "reward.judge.max_retries"),
        ("backoff_initial_s", -1.0, "backoff_initial_s"),
        ("cache_size", -1, "reward.judge.cache_size"),
        ("max_tokens", 0, "reward.judge.max_tokens"),
        ("user_prompt_template", "Q: {question} A: {answer}", "{prediction}"),
        ("user_prompt_template", "Q: {question} P: {prediction}", "{answer} or {ground_truth}"),
        ("provider", "bedrock", "reward.judge.provider"),
        ("answer_extraction", "loose", "reward.judge.answer_extraction"),
        ("prompt_files", {"system_prompt": "p.txt"}, "reward.judge.prompt_files: not read"),
        ("user_prompt_template", "{question} {answer} {prediction} {score}", "not a valid template"),
        ("user_prompt_template", "{question} {answer} {prediction} {", "not a valid template"),
    ],
)
def test_validate_judge_config_names_the_field(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        validate_judge_config(dataclasses.replace(JudgeConfig(), **{field: value}))


def test_default_config_is_valid_and_literal_braces_are_allowed() -> None:
    validate_judge_config(JudgeConfig())
    validate_judge_config(JudgeConfig(user_prompt_template='{question} {answer} {prediction} {{"score": 1}}'))


def test_missing_key_is_a_clear_error_and_the_key_is_not_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MINIO3_UNIT_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="MINIO3_UNIT_JUDGE_KEY"):
        JudgeClient(JudgeConfig(api_key_env="MINIO3_UNIT_JUDGE_KEY"))
    monkeypatch.setenv("MINIO3_UNIT_JUDGE_KEY", "sk-unit-secret")
    client = JudgeClient(JudgeConfig(api_key_env="MINIO3_UNIT_JUDGE_KEY"))
    assert "sk-unit-secret" not in repr(client)
    JudgeClient(JudgeConfig(api_key_env=""))  # a keyless local judge


def test_a_seed_style_template_with_ground_truth_is_valid() -> None:
    validate_judge_config(JudgeConfig(user_prompt_template="{question} / {ground_truth} / {prediction}"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"api_key_env": ""}, "api_key_env must name the key's variable with provider azure"),
        ({"azure": AzureJudgeConfig(endpoint_env="")}, "set endpoint or endpoint_env"),
        ({"azure": AzureJudgeConfig(api_version_env="")}, "set api_version or api_version_env"),
        ({"azure": AzureJudgeConfig(endpoint="res.openai.azure.com")}, "must start with http"),
        ({"azure": AzureJudgeConfig(endpoint="https://r.openai.azure.com/openai/deployments/d/chat/completions")},
         "the resource endpoint"),
    ],
)
def test_azure_values_are_checked(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_judge_config(JudgeConfig(**{"provider": "azure", "api_key_env": "API_KEY", **overrides}))


def test_azure_url_is_built_from_the_seed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEY", "azure-unit-secret")
    monkeypatch.setenv("END_POINT", "https://res.openai.azure.com/")
    monkeypatch.setenv("API_VERSION", "2024-10-21")
    client = JudgeClient(JudgeConfig(provider="azure", api_key_env="API_KEY", model="gpt-4o-2024-11-20"))
    assert client._url == "https://res.openai.azure.com/openai/deployments/gpt-4o-2024-11-20/chat/completions"
    assert client._params == {"api-version": "2024-10-21"}
    assert client._auth_headers == {"api-key": "azure-unit-secret"} and "azure-unit-secret" not in repr(client)
    monkeypatch.setenv("END_POINT", "https://res.openai.azure.com/openai/deployments/x/chat/completions?api-version=1")
    with pytest.raises(ValueError, match=r"\$END_POINT must be the resource endpoint"):
        JudgeClient(JudgeConfig(provider="azure", api_key_env="API_KEY"))


def test_read_prompt_files(tmp_path) -> None:
    (tmp_path / "user.txt").write_text("{question} {ground_truth} {prediction}\n")
    cfg = JudgeConfig(prompt_files={"user_prompt_template": str(tmp_path / "user.txt")})
    read_prompt_files(cfg)
    assert cfg.user_prompt_template == "{question} {ground_truth} {prediction}" and cfg.prompt_files == {}
    with pytest.raises(ValueError, match="unknown prompt 'user'"):
        read_prompt_files(JudgeConfig(prompt_files={"user": "x"}))
    with pytest.raises(ValueError, match="reward.judge.prompt_files.system_prompt: cannot read"):
        read_prompt_files(JudgeConfig(prompt_files={"system_prompt": str(tmp_path / "absent.txt")}))


@pytest.mark.parametrize(
    "mode, judged",
    [
        ("strict", "A"),
        ("split", "B"),
        ("strict_v2", "A</answer> <think>b</think><answer>B"),
        ("none", "<think>a</think><answer>A</answer> <think>b</think><answer>B</answer>"),
    ],
)
def test_the_client_judges_what_the_extraction_mode_reads(mode: str, judged: str) -> None:
    client = JudgeClient(JudgeConfig(api_key_env="", answer_extraction=mode))
    seen = []

    async def fake_judge(question: str, answer: str, prediction: str) -> Verdict:
        seen.append((question, answer, prediction))
        return Verdict(1.0, 1.0, {"has_answer": 1.0, "judge_attempts": 1.0})

    client.judge = fake_judge
    turns = ["<think>a</think><answer>A</answer>", "<think>b</think><answer>B</answer>"]
    verdict = asyncio.run(client(RewardInput("u", "s", "<image>\nq?", " red ", turns)))
    assert seen == [("q?", "red", judged)] and verdict.score == 1.0


def test_no_answer_tag_reaches_the_judge_only_in_the_modes_that_send_the_text() -> None:
    turns = ["<think>the car is red</think>red"]
    for mode, calls in (("strict", 0), ("strict_v2", 0), ("split", 1), ("none", 1)):
        client = JudgeClient(JudgeConfig(api_key_env="", answer_extraction=mode))
        seen = []

        async def fake_judge(question: str, answer: str, prediction: str, seen=seen) -> Verdict:
            seen.append(prediction)
            return Verdict(1.0, 1.0, {"has_answer": 1.0})

        client.judge = fake_judge
        verdict = asyncio.run(client(RewardInput("u", "s", "q", "red", turns)))
        assert len(seen) == calls and verdict.score == float(calls), mode
        assert verdict.metrics["has_answer"] == 0.0, mode  # no answer span, whatever was judged
