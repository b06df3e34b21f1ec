"""Reward configuration (owned by the rewards package).

The root config refers to this section as `reward: RewardConfig`. The dataclasses, their value checks
(`check_reward_values`, run by `validate()` and so by the config loader) and `read_prompt_files`; like all of
config/, this module imports nothing else of the package. Two kinds of check live with the rewards package and
run when `RewardManager(cfg.reward)` is built, before any worker starts: verifier names against its registry
(`register_verifier` may add names), and what needs the environment (the judge's key, Azure endpoint and
api-version: `JudgeClient`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megatron_minio3.config.files import read_text_files

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


JUDGE_PROVIDERS = ("openai", "azure")
# What the judge reads (the seed's data.extract_answer_tags; "none" = its data.gpt_extract_answer=False).
ANSWER_EXTRACTIONS = ("strict", "split", "strict_v2", "none")
TOOL_TERMS_MODES = ("ours", "original")
PROMPT_KEYS = ("system_prompt", "user_prompt_template")


@dataclass
class AzureJudgeConfig:
    """An Azure OpenAI deployment (reward.judge.provider: azure), as the seed's judge reaches it:
    POST {endpoint}/openai/deployments/{deployment}/chat/completions?api-version={api_version} with the key in
    an `api-key` header (reward.judge.api_key_env names its variable; the seed's is API_KEY)."""

    endpoint: str = ""  # https://<resource>.openai.azure.com; "" = read the variable named by endpoint_env
    endpoint_env: str = "END_POINT"  # the seed's variable
    api_version: str = ""  # e.g. 2024-10-21; "" = read the variable named by api_version_env
    api_version_env: str = "API_VERSION"  # the seed's variable
    # "" = reward.judge.model: the seed names its model, which the Azure client uses as the deployment
    deployment: str = ""


@dataclass
class JudgeConfig:
    """LLM judge over a chat-completions API: OpenAI-compatible (`{base_url}/chat/completions`) or Azure OpenAI."""

    # openai: {base_url}/chat/completions, Authorization: Bearer; azure: the `azure` section, api-key header
    provider: Literal["openai", "azure"] = "openai"
    base_url: str = "https://api.openai.com/v1"  # provider openai only
    model: str = "gpt-4o-2024-08-06"  # sent in every request; with provider azure also the default deployment
    # NAME of the environment variable that holds the API key ("" = send no key; provider azure needs one).
    api_key_env: str = "OPENAI_API_KEY"
    azure: AzureJudgeConfig = field(default_factory=AzureJudgeConfig)
    # The prediction the judge sees (the seed's modes; nothing to judge = score 0 without a call). "Response" is
    # the turns joined by a space, as the seed joins them.
    #   strict: the first <answer>..</answer> span over all turns (the recipe's); no span: nothing to judge
    #   split: the text after the last <answer> up to the next </answer> (with no tag, the whole response)
    #   strict_v2: from the first <answer> to a </answer> that ends the response; if it does not end so: nothing
    #   none: the whole response (the seed's gpt_extract_answer=False)
    answer_extraction: Literal["strict", "split", "strict_v2", "none"] = "strict"
    max_concurrency: int = 64  # requests in flight at once, per reward manager
    timeout_s: float = 60.0  # per HTTP attempt
    max_retries: int = 4  # attempts after the first; then the sample is marked failed
    backoff_initial_s: float = 1.0  # delay before retry k is initial * 2**k (jittered), capped below
    backoff_max_s: float = 30.0
    temperature: float = 0.0
    max_tokens: int = 32
    cache_size: int = 200_000  # verdicts kept, keyed by (question, answer, prediction)
    system_prompt: str = DEFAULT_JUDGE_SYSTEM_PROMPT  # "" = no system message
    # Must contain {question}, {prediction} and the reference as {answer} or {ground_truth} (the seed's name);
    # write literal braces as {{ }}.
    user_prompt_template: str = DEFAULT_JUDGE_USER_PROMPT
    # Either prompt from a file instead ({user_prompt_template: prompts/judge.txt}; paths relative to the working
    # directory): load_config reads each file (its text exactly, less one final newline) into the field and empties
    # this map, so the loaded config, and every checkpoint's config.yaml, holds the text.
    prompt_files: dict[str, str] = field(default_factory=dict)


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
    # tool_terms: ours
    #   score = accuracy_weight * verifier score + format_weight * format
    #           - tool_call_penalty * num_tool_calls - tool_error_penalty * num_tool_errors
    #           + tool_use_bonus * [used a tool and answered correctly]
    # tool_terms: original (the seed's formula; tool_call_penalty is then a fraction in [0, 1])
    #   score = (1 - tool_call_penalty * [used a tool]) * accuracy_weight * verifier score + format_weight * format
    #           + tool_use_bonus * [used a tool] - tool_error_penalty * num_tool_errors
    tool_terms: Literal["ours", "original"] = "ours"
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
        """Called by the config loader: the value checks below (the verifier names are checked against the
        registry when the RewardManager is built, before any worker starts)."""
        check_reward_values(self)


_WEIGHT_FIELDS = ("accuracy_weight", "format_weight", "tool_call_penalty", "tool_error_penalty", "tool_use_bonus")


def used_verifiers(cfg: RewardConfig) -> set[str]:
    """The verifier names the mapping and the default name."""
    return set(cfg.verifiers.values()) | ({cfg.default_verifier} if cfg.default_verifier else set())


def check_reward_values(cfg: RewardConfig) -> None:
    """ValueError naming the first `reward.*` field whose value cannot work; the verifier names are checked
    against the registry by the rewards package (`validate_reward_config`, run by RewardManager)."""
    for name in _WEIGHT_FIELDS:
        if not math.isfinite(getattr(cfg, name)):
            raise ValueError(f"reward.{name} must be a finite number, got {getattr(cfg, name)}")
    check_tool_terms(cfg)
    check_iou_values(cfg.iou)
    if "judge" in used_verifiers(cfg):
        check_judge_values(cfg.judge)
    for url in cfg.remote.urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward.remote.urls entries must start with http:// or https://, got {url!r}")
    if cfg.remote.timeout_s <= 0:
        raise ValueError(f"reward.remote.timeout_s must be > 0, got {cfg.remote.timeout_s}")
    if cfg.remote.max_request_bytes < 1024:
        raise ValueError(f"reward.remote.max_request_bytes must be >= 1024, got {cfg.remote.max_request_bytes}")
    if not cfg.verifier_timeout_s >= 0:
        raise ValueError(f"reward.verifier_timeout_s must be >= 0 (0 = no limit), got {cfg.verifier_timeout_s}")
    if cfg.verifier_workers < 1:
        raise ValueError(f"reward.verifier_workers must be >= 1, got {cfg.verifier_workers}")


def check_iou_values(iou: IoUConfig) -> None:
    if iou.schedule == "fixed":
        if not 0.0 <= iou.threshold <= 1.0:
            raise ValueError(f"reward.iou.threshold must be in [0, 1], got {iou.threshold}")
    elif iou.schedule == "dynamic":
        if len(iou.dynamic_thresholds) != len(iou.dynamic_boundaries) + 1:
            raise ValueError(
                "reward.iou.dynamic_thresholds needs exactly one more entry than reward.iou.dynamic_boundaries, "
                f"got {len(iou.dynamic_thresholds)} and {len(iou.dynamic_boundaries)}"
            )
        if any(not 0.0 <= t <= 1.0 for t in iou.dynamic_thresholds):
            raise ValueError(f"reward.iou.dynamic_thresholds must lie in [0, 1], got {iou.dynamic_thresholds}")
        bounds = iou.dynamic_boundaries
        if any(not 0.0 < b <= 1.0 for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(
                f"reward.iou.dynamic_boundaries must be increasing fractions of training in (0, 1], got {bounds}"
            )
    else:
        raise ValueError(f"reward.iou.schedule must be 'fixed' or 'dynamic', got {iou.schedule!r}")


def check_tool_terms(cfg: RewardConfig) -> None:
    """ValueError naming the key when reward.tool_terms cannot work with the weights given."""
    if cfg.tool_terms not in TOOL_TERMS_MODES:
        raise ValueError(f"reward.tool_terms must be one of {list(TOOL_TERMS_MODES)}, got {cfg.tool_terms!r}")
    if cfg.tool_terms == "original" and not 0.0 <= cfg.tool_call_penalty <= 1.0:
        raise ValueError(
            "reward.tool_call_penalty must lie in [0, 1] with reward.tool_terms: original (it is the fraction of the "
            f"accuracy term taken away when a tool was used), got {cfg.tool_call_penalty}"
        )


def check_judge_values(cfg: JudgeConfig) -> None:
    """ValueError naming the first field of `reward.judge` that cannot work (no environment lookups: JudgeClient
    does those)."""
    _check_judge_choices(cfg)
    if cfg.provider == "openai" and not cfg.base_url.startswith(("http://", "https://")):
        raise ValueError(f"reward.judge.base_url must start with http:// or https://, got {cfg.base_url!r}")
    if not cfg.model:
        raise ValueError("reward.judge.model must not be empty")
    if cfg.max_concurrency < 1:
        raise ValueError(f"reward.judge.max_concurrency must be >= 1, got {cfg.max_concurrency}")
    if cfg.timeout_s <= 0:
        raise ValueError(f"reward.judge.timeout_s must be > 0, got {cfg.timeout_s}")
    if cfg.max_retries < 0:
        raise ValueError(f"reward.judge.max_retries must be >= 0, got {cfg.max_retries}")
    if cfg.backoff_initial_s < 0 or cfg.backoff_max_s < 0:
        raise ValueError(
            f"reward.judge.backoff_initial_s and backoff_max_s must be >= 0, got "
            f"{cfg.backoff_initial_s} and {cfg.backoff_max_s}"
        )
    if cfg.cache_size < 0:
        raise ValueError(f"reward.judge.cache_size must be >= 0, got {cfg.cache_size}")
    if cfg.max_tokens < 1:
        raise ValueError(f"reward.judge.max_tokens must be >= 1, got {cfg.max_tokens}")
    for name in ("question", "prediction"):
        if "{" + name + "}" not in cfg.user_prompt_template:
            raise ValueError(f"reward.judge.user_prompt_template must contain {{{name}}}")
    if "{answer}" not in cfg.user_prompt_template and "{ground_truth}" not in cfg.user_prompt_template:
        raise ValueError("reward.judge.user_prompt_template must contain the reference as {answer} or {ground_truth}")
    try:
        cfg.user_prompt_template.format(question="", answer="", ground_truth="", prediction="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"reward.judge.user_prompt_template is not a valid template ({exc!r}); write literal braces as {{{{ }}}}"
        ) from None


def _check_judge_choices(cfg: JudgeConfig) -> None:
    """The provider (and its Azure settings), the extraction mode, the prompt files."""
    if cfg.provider not in JUDGE_PROVIDERS:
        raise ValueError(f"reward.judge.provider must be one of {list(JUDGE_PROVIDERS)}, got {cfg.provider!r}")
    if cfg.answer_extraction not in ANSWER_EXTRACTIONS:
        raise ValueError(
            f"reward.judge.answer_extraction must be one of {list(ANSWER_EXTRACTIONS)}, got {cfg.answer_extraction!r}"
        )
    if cfg.prompt_files:
        raise ValueError("reward.judge.prompt_files: not read (load_config reads them; call read_prompt_files)")
    if cfg.provider != "azure":
        return
    azure = cfg.azure
    if not cfg.api_key_env:
        raise ValueError(
            "reward.judge.api_key_env must name the key's variable with provider azure (the seed's: API_KEY)"
        )
    if not (azure.endpoint or azure.endpoint_env):
        raise ValueError("reward.judge.azure: set endpoint or endpoint_env (the seed's: END_POINT)")
    if not (azure.api_version or azure.api_version_env):
        raise ValueError("reward.judge.azure: set api_version or api_version_env (the seed's: API_VERSION)")
    if azure.endpoint:
        check_azure_endpoint(azure.endpoint, "reward.judge.azure.endpoint")


def check_azure_endpoint(endpoint: str, where: str) -> None:
    """An Azure resource endpoint (https://<resource>.openai.azure.com), not a full request URL."""
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"{where} must start with http:// or https://, got {endpoint!r}")
    if "/openai/deployments" in endpoint or "?" in endpoint:
        raise ValueError(
            f"{where} must be the resource endpoint (https://<resource>.openai.azure.com), not a request URL; "
            f"got {endpoint!r} (the deployment and api-version are reward.judge.azure.deployment and api_version)"
        )


def read_prompt_files(cfg: JudgeConfig) -> None:
    """Replace each prompt named in cfg.prompt_files by its file's text (less one final newline, which editors
    add); ValueError naming the key and the file at fault."""
    for key, text in read_text_files(cfg.prompt_files, PROMPT_KEYS, "reward.judge.prompt_files", "prompt").items():
        setattr(cfg, key, text)
    cfg.prompt_files = {}
