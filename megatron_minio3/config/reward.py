"""Reward configuration (owned by the rewards package).

The root config refers to this section as `reward: RewardConfig`. Only dataclasses and typing here;
`validate()` hands over to the rewards package (`megatron_minio3.rewards.manager.validate_reward_config`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DEFAULT_JUDGE_SYSTEM_PROMPT = (
    "You grade answers to visual questions. You cannot see the image; compare the model's prediction "
    "with the reference answer only."
)

DEFAULT_JUDGE_USER_PROMPT = (
    "Question: {question}\n"
    "Reference answer: {answer}\n"
    "Model prediction: {prediction}\n\n"
    "Does the prediction give the same answer as the reference? Differences in wording, letter case, "
    "punctuation or an added explanation do not matter; a different value, object, option letter or "
    "a hedge between several answers makes it wrong.\n"
    "Reply with one line, exactly \"Score: 1\" if it is correct or \"Score: 0\" if it is not."
)


@dataclass
class JudgeConfig:
    """LLM judge over an OpenAI-compatible `/chat/completions` endpoint."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-2024-08-06"
    # NAME of the environment variable that holds the API key ("" = send no Authorization header).
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 64  # requests in flight at once, per reward manager
    timeout_s: float = 60.0  # per HTTP attempt
    max_retries: int = 4  # attempts after the first; then the sample is marked failed
    backoff_initial_s: float = 1.0  # delay before retry k is initial * 2**k (jittered), capped below
    backoff_max_s: float = 30.0
    temperature: float = 0.0
    max_tokens: int = 32
    cache_size: int = 200_000  # verdicts kept, keyed by (question, answer, prediction)
    system_prompt: str = DEFAULT_JUDGE_SYSTEM_PROMPT
    # Must contain {question}, {answer} and {prediction}; write literal braces as {{ }}.
    user_prompt_template: str = DEFAULT_JUDGE_USER_PROMPT


@dataclass
class IoUConfig:
    """Box answers: reward = IoU when IoU >= threshold, else 0."""

    schedule: Literal["fixed", "dynamic"] = "fixed"
    threshold: float = 0.5  # used when schedule == "fixed"
    # schedule == "dynamic" (V-Triune): thresholds[i] applies while step/total_steps < boundaries[i];
    # the last threshold applies after the last boundary.
    dynamic_thresholds: list[float] = field(default_factory=lambda: [0.85, 0.95, 0.99])
    dynamic_boundaries: list[float] = field(default_factory=lambda: [0.1, 0.25])


@dataclass
class RemoteRewardConfig:
    """Score on reward servers (`python -m megatron_minio3.rewards.server`) instead of in-process."""

    urls: list[str] = field(default_factory=list)  # empty = score in-process
    token_env: str = "MINIO3_REWARD_TOKEN"  # NAME of the env variable holding the bearer token
    timeout_s: float = 900.0  # one HTTP request carries a whole chunk of samples
    # Largest /score body: the server answers HTTP 413 above it; the client splits its chunks to stay under it
    # (a single sample larger than this fails with that reason).
    max_request_bytes: int = 32 * 2**20
    # The server answers HTTP 504 when scoring one request takes longer than this (0 = no limit); below timeout_s,
    # so the trainer gets the server's reason rather than its own time-out. Its samples come back failed.
    max_request_s: float = 600.0


@dataclass
class RewardConfig:
    # data_source -> verifier name (mc, exact, math, iou, judge); unmapped sources use default_verifier
    # ("" = an unmapped data_source is an error).
    verifiers: dict[str, str] = field(default_factory=dict)
    default_verifier: str = "judge"
    # score = accuracy_weight * verifier score + format_weight * format
    #         - tool_call_penalty * num_tool_calls - tool_error_penalty * num_tool_errors
    #         + tool_use_bonus * [used a tool and answered correctly]
    accuracy_weight: float = 1.0
    format_weight: float = 0.0
    tool_call_penalty: float = 0.0
    tool_error_penalty: float = 0.0
    tool_use_bonus: float = 0.0
    # Rule-based verifiers (mc, exact, math, iou, registered sync functions) run in `verifier_workers` worker
    # processes; a sample not scored within `verifier_timeout_s` seconds has its worker killed and fails
    # ("no verdict within ..."), like any verifier failure. 0 = score in the calling process, with no limit.
    verifier_timeout_s: float = 10.0
    verifier_workers: int = 2
    # Training: a sample whose verifier failed gets score NaN and its whole group should be dropped.
    # False: it scores 0 (still flagged failed and counted). Validation always scores it 0.
    drop_failed_groups: bool = True
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    iou: IoUConfig = field(default_factory=IoUConfig)
    remote: RemoteRewardConfig = field(default_factory=RemoteRewardConfig)

    def validate(self) -> None:
        """Called by the config loader; the checks live with the rewards package (imported only here)."""
        from megatron_minio3.rewards.manager import validate_reward_config

        validate_reward_config(self)
