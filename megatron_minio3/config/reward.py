"""Reward configuration (owned by the rewards package)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RewardConfig:
    pass
