"""Records passed into and out of the reward stage."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RewardInput:
    """One finished trajectory, as the reward stage sees it.

    `turns` are the assistant turn texts in order, the final turn last, without chat-template tokens.
    `verifier`, when set, overrides the data_source -> verifier mapping for this sample.
    """

    uid: str
    data_source: str
    question: str
    ground_truth: str
    turns: list[str]
    num_tool_calls: int = 0
    num_tool_errors: int = 0
    verifier: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "data_source": self.data_source,
            "question": self.question,
            "ground_truth": self.ground_truth,
            "turns": list(self.turns),
            "num_tool_calls": self.num_tool_calls,
            "num_tool_errors": self.num_tool_errors,
            "verifier": self.verifier,
        }


@dataclass
class RewardResult:
    """Score of one trajectory. `failed` means the verifier could not decide (see RewardManager.score)."""

    score: float
    failed: bool
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # JSON has no NaN: a training failure's NaN score travels as null.
        score = None if math.isnan(self.score) else self.score
        return {"score": score, "failed": self.failed, "metrics": dict(self.metrics), "error": self.error}

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> RewardResult:
        score = payload["score"]
        return cls(
            score=float("nan") if score is None else float(score),
            failed=bool(payload["failed"]),
            metrics={str(k): float(v) for k, v in payload["metrics"].items()},
            error=payload["error"],
        )


def failure_score(validation: bool, drop_failed_groups: bool) -> float:
    """The score a failed sample carries: 0 in validation (counted as wrong) or when failed groups are kept
    in training; NaN when its group must be dropped, so that using it by mistake cannot go unnoticed."""
    return 0.0 if validation or not drop_failed_groups else math.nan


@dataclass
class Verdict:
    """What one verifier says about one sample.

    `score` is the verifier's reward term (0..1 for the built-in verifiers), `accuracy` is 1.0 when the
    answer counts as correct. A failed verdict (`failed=True`) carries an `error` and no usable score.
    """

    score: float
    accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)
    failed: bool = False
    error: str | None = None

    @classmethod
    def failure(cls, error: str, metrics: dict[str, float] | None = None) -> Verdict:
        return cls(score=0.0, accuracy=0.0, metrics=dict(metrics or {}), failed=True, error=error)
