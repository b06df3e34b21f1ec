"""LLM judge over a chat-completions API (OpenAI-compatible or an Azure OpenAI deployment): async, bounded
concurrency, timeouts, retries, cache.

A sample with nothing to judge (reward.judge.answer_extraction found no answer, or an empty one) scores 0 without
a call. A judge that does not give a usable verdict after all retries yields a failed Verdict (never a silent 0).
The API key is read from the environment variable named in the config and kept out of reprs, logs and error
messages; with provider azure the endpoint and api-version may come from the environment too (the seed's
END_POINT and API_VERSION).
"""
from __future__ import annotations

import asyncio
import logging
import os
import random
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import quote

import httpx

from megatron_minio3.config.reward import JudgeConfig, check_azure_endpoint, check_judge_values
from megatron_minio3.rewards.extract import first_answer, judge_prediction
from megatron_minio3.rewards.types import RewardInput, Verdict

if TYPE_CHECKING:
    from megatron_minio3.rewards.verifiers import ScoringContext

logger = logging.getLogger(__name__)

# "Score: 1", "**Score:** 0", "score=1"; not "Score: 0.5", "Score: 10", nor an echoed "Score: 0 or 1".
_SCORE_RE = re.compile(r"score\s*\**\s*[:：=]\s*\**\s*([01])(?![\d.]|\s*(?:or|/)\s*[01])", re.IGNORECASE)
_IMAGE_PLACEHOLDER = "<image>"
_ERROR_BODY_CHARS = 200
_SLOTS_PER_CLIENT = 16

JudgeKey = tuple[str, str, str]


def parse_judge_score(reply: str) -> int | None:
    """The 0/1 verdict in a judge reply ("Score: 1", "**Score:** 0", or a bare "1").

    None when there is no verdict or the reply gives both 0 and 1.
    """
    stripped = reply.strip()
    if stripped in ("0", "1"):
        return int(stripped)
    values = {int(v) for v in _SCORE_RE.findall(reply)}
    return values.pop() if len(values) == 1 else None


def validate_judge_config(cfg: JudgeConfig) -> None:
    """Raise ValueError naming the first field of `reward.judge` that cannot work (no environment lookups)."""
    check_judge_values(cfg)


@dataclass
class _Outcome:
    score: int | None  # None = failed
    num_attempts: int
    error: str | None = None


@dataclass
class _LoopState:
    """Objects bound to one event loop: HTTP clients, request slots, the shared in-flight calls.

    `slots` holds one entry per request allowed in flight (max_concurrency in all); taking one is the
    permission to send and names the client to send with. Each client serves at most
    _SLOTS_PER_CLIENT slots: httpcore's pool does work proportional to its size on every request
    (1000 requests at 64 in flight: one 64-connection client used 2-4x the CPU of four 16-connection ones).
    """

    loop: asyncio.AbstractEventLoop
    clients: list[httpx.AsyncClient]
    slots: asyncio.Queue[httpx.AsyncClient]
    in_flight: dict[JudgeKey, asyncio.Future] = field(default_factory=dict)


class JudgeClient:
    """Scores (question, reference answer, prediction) triples with an LLM judge."""

    def __init__(self, cfg: JudgeConfig):
        validate_judge_config(cfg)
        self.cfg = cfg
        self._api_key = ""
        if cfg.api_key_env:
            self._api_key = os.environ.get(cfg.api_key_env, "")
            if not self._api_key:
                raise ValueError(
                    f"reward.judge.api_key_env: environment variable {cfg.api_key_env!r} is not set "
                    "(set it, or set api_key_env to \"\" for a judge that needs no key)"
                )
        self._params: dict[str, str] = {}
        if cfg.provider == "azure":  # the URL layout and header of Azure OpenAI's chat completions
            azure = cfg.azure
            endpoint = azure.endpoint or _from_env(azure.endpoint_env, "reward.judge.azure.endpoint_env")
            where = "reward.judge.azure.endpoint" if azure.endpoint else f"${azure.endpoint_env}"
            check_azure_endpoint(endpoint, where)
            deployment = quote(azure.deployment or cfg.model, safe="")
            self._url = f"{endpoint.rstrip('/')}/openai/deployments/{deployment}/chat/completions"
            version = azure.api_version or _from_env(azure.api_version_env, "reward.judge.azure.api_version_env")
            self._params = {"api-version": version}
            self._auth_headers = {"api-key": self._api_key}
        else:
            self._url = cfg.base_url.rstrip("/") + "/chat/completions"
            self._auth_headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._cache: OrderedDict[JudgeKey, int] = OrderedDict()
        self._state: _LoopState | None = None

    def __repr__(self) -> str:
        return f"JudgeClient(provider={self.cfg.provider!r}, url={self._url!r}, model={self.cfg.model!r})"

    async def __call__(self, inp: RewardInput, ctx: ScoringContext | None = None) -> Verdict:
        """Verifier entry point: judge what reward.judge.answer_extraction reads from the trajectory.

        `has_answer` says whether the trajectory holds an answer span, whatever the extraction mode."""
        prediction = judge_prediction(inp.turns, self.cfg.answer_extraction)
        has_answer = 0.0 if first_answer(inp.turns) is None else 1.0
        if not inp.ground_truth.strip():
            return Verdict.failure("judge: empty ground truth")
        if not prediction:
            return Verdict(score=0.0, accuracy=0.0, metrics={"has_answer": has_answer, "judge_attempts": 0.0})
        question = inp.question.replace(_IMAGE_PLACEHOLDER, "").strip()
        verdict = await self.judge(question, inp.ground_truth.strip(), prediction)
        verdict.metrics["has_answer"] = has_answer
        return verdict

    async def judge(self, question: str, answer: str, prediction: str) -> Verdict:
        """One verdict; identical triples share one call (cached once answered, joined while in flight)."""
        key = (question, answer, prediction)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return self._verdict(_Outcome(cached, 0), cache_hit=True)
        state = self._loop_state()
        pending = state.in_flight.get(key)
        shared = pending is not None
        if pending is None:
            pending = asyncio.ensure_future(self._call_with_retries(state, key))
            state.in_flight[key] = pending
            pending.add_done_callback(lambda _: state.in_flight.pop(key, None))
        outcome = await asyncio.shield(pending)
        return self._verdict(outcome, cache_hit=shared)

    async def aclose(self) -> None:
        """Close the HTTP clients of the running loop (the next call opens new ones)."""
        state, self._state = self._state, None
        if state is not None and state.loop is asyncio.get_running_loop():
            for client in state.clients:
                await client.aclose()

    def _verdict(self, outcome: _Outcome, cache_hit: bool) -> Verdict:
        metrics = {
            "has_answer": 1.0,
            "judge_attempts": float(outcome.num_attempts),
            "judge_cache_hit": float(cache_hit),
        }
        if outcome.score is None:
            return Verdict.failure(outcome.error or "judge failed", metrics)
        value = float(outcome.score)
        return Verdict(score=value, accuracy=value, metrics=metrics)

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            num_clients = -(-self.cfg.max_concurrency // _SLOTS_PER_CLIENT)
            limits = httpx.Limits(max_connections=_SLOTS_PER_CLIENT, max_keepalive_connections=_SLOTS_PER_CLIENT)
            clients = [
                httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.cfg.timeout_s)) for _ in range(num_clients)
            ]
            slots: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
            for slot in range(self.cfg.max_concurrency):
                slots.put_nowait(clients[slot % num_clients])
            self._state = _LoopState(loop=loop, clients=clients, slots=slots)
        return self._state

    def _request_body(self, key: JudgeKey) -> dict:
        question, answer, prediction = key
        messages = []
        if self.cfg.system_prompt:
            messages.append({"role": "system", "content": self.cfg.system_prompt})
        user = self.cfg.user_prompt_template.format(
            question=question, answer=answer, ground_truth=answer, prediction=prediction
        )
        messages.append({"role": "user", "content": user})
        return {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": self.cfg.temperature,
            "max_tokens": self.cfg.max_tokens,
        }

    def _refusal_hint(self, status: int) -> str:
        """What a 401/403/404 most likely means, naming the variables and keys to check."""
        cfg = self.cfg
        if status in (401, 403):
            if not self._api_key:
                return " (no key was sent: reward.judge.api_key_env is empty)"
            header = "api-key header" if cfg.provider == "azure" else "Authorization header"
            return f" (the key in ${cfg.api_key_env}, sent as the {header}, was refused; reward.judge.api_key_env)"
        if status == 404 and cfg.provider == "azure":
            return (
                f" (no deployment {cfg.azure.deployment or cfg.model!r} at this endpoint, or no api-version "
                f"{self._params['api-version']!r} there: check reward.judge.azure.deployment (empty: "
                "reward.judge.model), .endpoint or its variable, .api_version or its variable)"
            )
        return ""

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _backoff_s(self, retry: int, retry_after_s: float | None) -> float:
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** (retry - 1))
        delay *= random.uniform(0.5, 1.0)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.cfg.backoff_max_s))
        return delay

    async def _call_with_retries(self, state: _LoopState, key: JudgeKey) -> _Outcome:
        body = self._request_body(key)
        error = "no attempt made"
        retry_after_s: float | None = None
        num_attempts = 0
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff_s(attempt, retry_after_s))
            retry_after_s = None
            num_attempts += 1
            client = await state.slots.get()
            try:
                async with asyncio.timeout(self.cfg.timeout_s):
                    response = await client.post(self._url, params=self._params, json=body, headers=self._auth_headers)
            except (TimeoutError, httpx.TimeoutException):
                error = f"no reply within {self.cfg.timeout_s} s"
                logger.debug("judge attempt %d: %s", num_attempts, error)
                continue
            except httpx.HTTPError as exc:
                error = self._scrub(f"{type(exc).__name__}: {exc}")
                logger.debug("judge attempt %d: %s", num_attempts, error)
                continue
            finally:
                state.slots.put_nowait(client)
            status = response.status_code
            if status == 429 or status >= 500:
                error = self._scrub(f"HTTP {status}: {response.text[:_ERROR_BODY_CHARS]}")
                retry_after_s = _retry_after_s(response)
                logger.debug("judge attempt %d: %s", num_attempts, error)
                continue
            if status >= 400:  # the request itself is wrong (auth, model name): retrying cannot help
                error = self._scrub(f"HTTP {status}: {response.text[:_ERROR_BODY_CHARS]}")
                return _Outcome(None, num_attempts, f"judge: {error}{self._refusal_hint(status)}")
            try:
                reply = response.json()["choices"][0]["message"]["content"]
                score = parse_judge_score(reply)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                error = self._scrub(f"malformed reply: {response.text[:_ERROR_BODY_CHARS]!r}")
                logger.debug("judge attempt %d: %s", num_attempts, error)
                continue
            if score is None:
                error = self._scrub(f"no 'Score: 0/1' verdict in reply {reply[:_ERROR_BODY_CHARS]!r}")
                logger.debug("judge attempt %d: %s", num_attempts, error)
                continue
            self._remember(key, score)
            return _Outcome(score, num_attempts)
        return _Outcome(None, num_attempts, f"judge: failed after {num_attempts} attempts, last error: {error}")

    def _remember(self, key: JudgeKey, score: int) -> None:
        if self.cfg.cache_size == 0:
            return
        self._cache[key] = score
        self._cache.move_to_end(key)
        while len(self._cache) > self.cfg.cache_size:
            self._cache.popitem(last=False)


def _from_env(name: str, key: str) -> str:
    value = os.environ.get(name, "") if name else ""
    if not value:
        raise ValueError(f"{key}: environment variable {name!r} is not set (set it, or give the value in the config)")
    return value


def _retry_after_s(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds, when it is a number."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None
