"""RewardManager: picks a verifier per sample, adds the weighted extra terms, keeps failures visible.

Failure semantics (a verifier that could not decide, e.g. a judge that never answered):
- validation: score 0.0, `failed=True`, counted in `reward/<source>/num_failed`;
- training with `reward.drop_failed_groups` (default): score NaN, `failed=True`; the caller drops the
  sample's whole group (`RewardManager.drop_mask`, or pass `failed` to the dynamic-sampling filter);
- training without it: score 0.0, still `failed=True` and counted.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from megatron_minio3.config.reward import RewardConfig, check_reward_values, used_verifiers
from megatron_minio3.rewards.extract import is_well_formatted
from megatron_minio3.rewards.isolation import (
    WARM_MODULES,
    VerifierRaised,
    VerifierTimeout,
    VerifierWorkerDied,
    can_send,
    shared_pool,
)
from megatron_minio3.rewards.types import RewardInput, RewardResult, Verdict, failure_score
from megatron_minio3.rewards.verifiers import VERIFIER_FACTORIES, ScoringContext, VerifierFn

if TYPE_CHECKING:
    from megatron_minio3.rewards.client import RemoteRewardClient

logger = logging.getLogger(__name__)


def validate_reward_config(cfg: RewardConfig) -> None:
    """Raise ValueError naming the first `reward.*` field that cannot work (no network, no env lookups): the
    verifier names against the registry (register_verifier may add some), then the section's own value checks
    (`check_reward_values`, which the config loader runs without importing this package)."""
    for source, name in cfg.verifiers.items():
        if name not in VERIFIER_FACTORIES:
            raise ValueError(
                f"reward.verifiers[{source!r}] = {name!r} is not a verifier; known: {sorted(VERIFIER_FACTORIES)}"
            )
    if cfg.default_verifier and cfg.default_verifier not in VERIFIER_FACTORIES:
        raise ValueError(
            f"reward.default_verifier = {cfg.default_verifier!r} is not a verifier; "
            f"known: {sorted(VERIFIER_FACTORIES)} (or \"\" for none)"
        )
    check_reward_values(cfg)


class RewardManager:
    """Scores batches of finished trajectories, in-process or on reward servers (`reward.remote.urls`)."""

    def __init__(self, cfg: RewardConfig):
        validate_reward_config(cfg)
        self.cfg = cfg
        self._verifiers: dict[str, VerifierFn] = {}
        self._isolated: dict[str, bool] = {}
        self._remote: RemoteRewardClient | None = None
        if cfg.remote.urls:
            from megatron_minio3.rewards.client import RemoteRewardClient

            self._remote = RemoteRewardClient(cfg.remote)
        else:
            for name in sorted(used_verifiers(cfg)):  # build now: a missing judge key fails at start-up
                self._verifier(name)

    def verifier_name(self, inp: RewardInput) -> str:
        """The verifier for one sample: its own `verifier`, else the data_source mapping, else the default."""
        name = inp.verifier or self.cfg.verifiers.get(inp.data_source) or self.cfg.default_verifier
        if not name:
            raise ValueError(
                f"data_source {inp.data_source!r} (sample {inp.uid!r}) has no verifier: add it to "
                "reward.verifiers or set reward.default_verifier"
            )
        if name not in VERIFIER_FACTORIES:
            raise ValueError(
                f"sample {inp.uid!r} asks for verifier {name!r}, which does not exist; "
                f"known: {sorted(VERIFIER_FACTORIES)}"
            )
        return name

    async def score(
        self, inputs: list[RewardInput], *, validation: bool, step: int = 0, total_steps: int = 1
    ) -> list[RewardResult]:
        """One RewardResult per input, in order. `step` (0-based) of `total_steps` drives step schedules."""
        if total_steps < 1 or step < 0:
            raise ValueError(f"need step >= 0 and total_steps >= 1, got step={step}, total_steps={total_steps}")
        for inp in inputs:
            _check_input(inp)
        if self._remote is not None:
            results = await self._remote.score(inputs, validation=validation, step=step, total_steps=total_steps)
            for result in results:  # this side's policy decides what a failure scores
                if result.failed:
                    result.score = failure_score(validation, self.cfg.drop_failed_groups)
        else:
            names = [self.verifier_name(inp) for inp in inputs]
            ctx = ScoringContext(step=step, total_steps=total_steps, cfg=self.cfg)
            results = list(
                await asyncio.gather(
                    *(self._score_one(inp, name, ctx, validation) for inp, name in zip(inputs, names, strict=True))
                )
            )
        _log_failures(inputs, results, validation)
        return results

    def score_sync(
        self, inputs: list[RewardInput], *, validation: bool, step: int = 0, total_steps: int = 1
    ) -> list[RewardResult]:
        """`score` for callers without an event loop (it runs one and closes its connections after)."""

        async def run() -> list[RewardResult]:
            try:
                return await self.score(inputs, validation=validation, step=step, total_steps=total_steps)
            finally:
                await self.aclose()

        return asyncio.run(run())

    def drop_mask(self, results: list[RewardResult], *, validation: bool) -> list[bool]:
        """True for samples whose failure must drop their whole group (training with drop_failed_groups)."""
        if validation or not self.cfg.drop_failed_groups:
            return [False] * len(results)
        return [result.failed for result in results]

    async def aclose(self) -> None:
        """Close HTTP connections opened on the running event loop."""
        for verifier in self._verifiers.values():
            close = getattr(verifier, "aclose", None)  # verifiers holding connections (the judge) have one
            if close is not None:
                await close()

    def _verifier(self, name: str) -> VerifierFn:
        if name not in self._verifiers:
            self._verifiers[name] = VERIFIER_FACTORIES[name](self.cfg)
        return self._verifiers[name]

    def _runs_isolated(self, name: str, verifier: VerifierFn) -> bool:
        """Sync verifier functions go to the worker processes (time limit); async ones (the judge, with its own
        timeouts and retries) run here. A sync function that cannot be sent (a closure) runs here, unlimited."""
        if name not in self._isolated:
            sync_function = inspect.isfunction(verifier) and not inspect.iscoroutinefunction(verifier)
            isolated = self.cfg.verifier_timeout_s > 0 and sync_function and can_send(verifier)
            if self.cfg.verifier_timeout_s > 0 and sync_function and not isolated:
                logger.warning("verifier %r cannot be sent to a worker process (not a module-level function): it "
                               "runs in this process, without reward.verifier_timeout_s", name)
            self._isolated[name] = isolated
        return self._isolated[name]

    async def _run_isolated(self, name: str, verifier: VerifierFn, inp: RewardInput, ctx: ScoringContext) -> Verdict:
        # math-verify takes seconds to import: workers import it up front when a mapping uses it, so that the
        # time limit measures the scoring
        warm = WARM_MODULES + (("math_verify",) if "math" in used_verifiers(self.cfg) else ())
        pool = shared_pool(self.cfg.verifier_workers, warm)
        timeout_s = self.cfg.verifier_timeout_s
        try:
            return await pool.submit(timeout_s, verifier, inp, ctx)
        except VerifierTimeout:
            return Verdict.failure(f"{name}: no verdict within reward.verifier_timeout_s={timeout_s:g} s "
                                   "(the verifier was stopped)")
        except (VerifierWorkerDied, VerifierRaised) as exc:
            logger.warning("verifier %r on sample %r: %s", name, inp.uid, exc)
            return Verdict.failure(f"{name}: {exc}")

    async def _score_one(self, inp: RewardInput, name: str, ctx: ScoringContext, validation: bool) -> RewardResult:
        try:
            verifier = self._verifier(name)
            if self._runs_isolated(name, verifier):
                verdict = await self._run_isolated(name, verifier, inp, ctx)
            else:
                verdict = verifier(inp, ctx)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
        except Exception as exc:  # a verifier bug is one failed sample, reported, not a crashed step
            logger.exception("verifier %r raised on sample %r", name, inp.uid)
            verdict = Verdict.failure(f"{name}: {type(exc).__name__}: {exc}")
        return self._combine(inp, verdict, validation)

    def _combine(self, inp: RewardInput, verdict: Verdict, validation: bool) -> RewardResult:
        cfg = self.cfg
        formatted = 1.0 if is_well_formatted(inp.turns) else 0.0
        metrics = dict(verdict.metrics)
        metrics.update(
            accuracy=verdict.accuracy,
            verifier_score=verdict.score,
            format=formatted,
            num_tool_calls=float(inp.num_tool_calls),
            num_tool_errors=float(inp.num_tool_errors),
        )
        if verdict.failed:
            metrics.update(accuracy=0.0, verifier_score=0.0)
            return RewardResult(failure_score(validation, cfg.drop_failed_groups), True, metrics, verdict.error)
        score = combine_score(cfg, verdict.score, verdict.accuracy, formatted, inp.num_tool_calls, inp.num_tool_errors)
        return RewardResult(score=score, failed=False, metrics=metrics, error=None)


def combine_score(
    cfg: RewardConfig,
    verifier_score: float,
    accuracy: float,
    formatted: float,
    num_tool_calls: int,
    num_tool_errors: int,
) -> float:
    """The sample's reward from its verifier score and extra terms, by reward.tool_terms (docs/rewards.md).

    ours: the penalty is per call, the bonus needs a tool call and a correct answer (accuracy >= 0.5).
    original (the seed's compute_score): one call or more scales the accuracy term by (1 - tool_call_penalty)
    and earns the bonus whether or not the answer is right. tool_error_penalty, ours, applies in both.
    """
    used_tool = num_tool_calls > 0
    if cfg.tool_terms == "original":
        kept = 1.0 - cfg.tool_call_penalty if used_tool else 1.0
        return (
            kept * cfg.accuracy_weight * verifier_score
            + cfg.format_weight * formatted
            + (cfg.tool_use_bonus if used_tool else 0.0)
            - cfg.tool_error_penalty * num_tool_errors
        )
    used_tool_and_correct = 1.0 if used_tool and accuracy >= 0.5 else 0.0
    return (
        cfg.accuracy_weight * verifier_score
        + cfg.format_weight * formatted
        - cfg.tool_call_penalty * num_tool_calls
        - cfg.tool_error_penalty * num_tool_errors
        + cfg.tool_use_bonus * used_tool_and_correct
    )


def _check_input(inp: RewardInput) -> None:
    if not isinstance(inp.turns, list) or not all(isinstance(t, str) for t in inp.turns):
        raise ValueError(f"sample {inp.uid!r}: turns must be a list of strings")
    if inp.num_tool_calls < 0 or inp.num_tool_errors < 0:
        raise ValueError(
            f"sample {inp.uid!r}: num_tool_calls and num_tool_errors must be >= 0, "
            f"got {inp.num_tool_calls} and {inp.num_tool_errors}"
        )


def _log_failures(inputs: list[RewardInput], results: list[RewardResult], validation: bool) -> None:
    failed = [(inp, res) for inp, res in zip(inputs, results, strict=True) if res.failed]
    if not failed:
        return
    by_source = Counter(inp.data_source for inp, _ in failed)
    first_inp, first_res = failed[0]
    logger.warning(
        "%s: %d of %d samples failed to score (%s); first: sample %r: %s",
        "validation" if validation else "training",
        len(failed),
        len(results),
        ", ".join(f"{source}: {n}" for source, n in sorted(by_source.items())),
        first_inp.uid,
        first_res.error,
    )


def reward_metrics_by_source(inputs: Sequence[RewardInput], results: Sequence[RewardResult]) -> dict[str, float]:
    """Logging metrics: for each data_source `reward/<source>/{mean,accuracy,format,num_failed,num_samples}`
    and the same over all samples as `reward/{mean,...}`. Only `data_source` is read from `inputs` (the
    controller passes trajectory summaries, which have it too).

    `mean` and `accuracy` average the samples with a finite score: failed validation samples count as 0,
    failed training samples (NaN, their group is dropped) are left out and show in `num_failed`.
    """
    if len(inputs) != len(results):
        raise ValueError(f"got {len(inputs)} inputs but {len(results)} results")
    groups: dict[str, list[RewardResult]] = defaultdict(list)
    for inp, result in zip(inputs, results, strict=True):
        groups[f"reward/{inp.data_source}/"].append(result)
        groups["reward/"].append(result)
    metrics: dict[str, float] = {}
    for prefix, group in groups.items():
        scored = [r for r in group if math.isfinite(r.score)]
        metrics[prefix + "num_samples"] = float(len(group))
        metrics[prefix + "num_failed"] = float(sum(r.failed for r in group))
        metrics[prefix + "format"] = sum(r.metrics.get("format", 0.0) for r in group) / len(group)
        if scored:
            metrics[prefix + "mean"] = sum(r.score for r in scored) / len(scored)
            metrics[prefix + "accuracy"] = sum(r.metrics.get("accuracy", 0.0) for r in scored) / len(scored)
    return metrics
