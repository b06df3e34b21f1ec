"""Rollout and evaluation configuration (owned by the rollout package)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RolloutConfig:
    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class EvalConfig:
    k: int = 32
