"""Sampling seeds derived from what a request is, never from how many were made before it.

Every generation request carries its own seed (vLLM `SamplingParams(seed=...)`: a per-request generator), derived
from the run's `rollout.seed`, the step, the generation round, the prompt's position in that round and its uid,
the sample index and the turn. So a request samples the same tokens whatever ran before it in the engine (another
trajectory, the probe, an engine started fresh by a resumed run) and whatever the number of rollout handles
(the position is the prompt's place in the whole round, before the round is split over the handles). A run
resumed after step k therefore samples step k+1 exactly as an uninterrupted run does, given the same weights.
"""
from __future__ import annotations

import hashlib

SEED_BITS = 63  # vLLM and torch take seeds as signed 64-bit integers


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` (ints and strings; their repr is hashed, so 1 and "1" differ)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


def round_prompt_seeds(seed: int, step: int, round_index: int, uids: list[str]) -> list[int]:
    """One base seed per prompt of a generation round (the prompts in the round's order)."""
    return [derive_seed("rollout", seed, step, round_index, position, uid) for position, uid in enumerate(uids)]


def eval_prompt_seeds(seed: int, step: int, first: int, uids: list[str]) -> list[int]:
    """Base seeds of evaluation prompts `first`, `first + 1`, ... after training step `step`."""
    return [derive_seed("eval", seed, step, first + offset, uid) for offset, uid in enumerate(uids)]


def request_seed(prompt_seed: int, sample_index: int, turn: int) -> int:
    """The seed of one request: turn `turn` of sample `sample_index` of the prompt whose base seed is given."""
    return derive_seed(prompt_seed, sample_index, turn)
