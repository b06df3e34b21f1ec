"""Judge pieces that need no server: verdict parsing, config validation, key handling."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_minio3.config.reward import JudgeConfig
from megatron_minio3.rewards.judge import JudgeClient, parse_judge_score, validate_judge_config


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
