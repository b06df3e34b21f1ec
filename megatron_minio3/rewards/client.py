"""Client for reward servers: splits a batch over several servers; an unreachable one fails its samples."""
from __future__ import annotations

import asyncio
import json
import logging
import os

import httpx

from megatron_minio3.config.reward import RemoteRewardConfig
from megatron_minio3.rewards.types import RewardInput, RewardResult

logger = logging.getLogger(__name__)

_ERROR_BODY_CHARS = 300


def split_evenly(num_items: int, num_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges covering num_items, sizes differing by at most one, none empty."""
    num_parts = min(num_parts, num_items)
    if num_parts == 0:
        return []
    base, extra = divmod(num_items, num_parts)
    ranges, start = [], 0
    for part in range(num_parts):
        end = start + base + (1 if part < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


_PAYLOAD_OVERHEAD_BYTES = 256  # {"inputs": [...], "validation": ..., "step": ..., "total_steps": ...}


def split_by_size(sizes: list[int], max_bytes: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges, each as long as possible with sum(sizes) + separators within
    `max_bytes`; an item larger than `max_bytes` alone gets a range of its own (the caller refuses it)."""
    ranges, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and total + size + 1 > max_bytes:
            ranges.append((start, index))
            start, total = index, 0
        total += size + 1
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


class RemoteRewardClient:
    """Scores on the servers in `reward.remote.urls`, one contiguous chunk of the batch per server.

    A server that cannot be reached, answers an HTTP error, or returns a malformed body makes every
    sample of its chunk a failed result (with the reason); the other chunks are unaffected.
    """

    def __init__(self, cfg: RemoteRewardConfig):
        if not cfg.urls:
            raise ValueError("reward.remote.urls is empty")
        self.cfg = cfg
        self._urls = [url.rstrip("/") for url in cfg.urls]
        self._token = os.environ.get(cfg.token_env, "") if cfg.token_env else ""
        self._next_server = 0  # the first chunk's server; moves on by one each call to even out the load

    def __repr__(self) -> str:
        return f"RemoteRewardClient(urls={self._urls!r})"

    async def score(
        self, inputs: list[RewardInput], *, validation: bool, step: int, total_steps: int
    ) -> list[RewardResult]:
        ranges = split_evenly(len(inputs), len(self._urls))
        first = self._next_server
        self._next_server = (first + 1) % len(self._urls)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.cfg.timeout_s), headers=self._headers()) as http:
            chunks = await asyncio.gather(
                *(
                    self._score_chunk(
                        http,
                        self._urls[(first + i) % len(self._urls)],
                        inputs[start:end],
                        validation,
                        step,
                        total_steps,
                    )
                    for i, (start, end) in enumerate(ranges)
                )
            )
        return [result for chunk in chunks for result in chunk]

    async def health(self) -> dict[str, bool]:
        """url -> whether its /health endpoint answered 200."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:

            async def check(url: str) -> bool:
                try:
                    return (await http.get(url + "/health")).status_code == 200
                except httpx.HTTPError:
                    return False

            return dict(zip(self._urls, await asyncio.gather(*(check(u) for u in self._urls)), strict=True))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"} if self._token else {}

    async def _score_chunk(
        self,
        http: httpx.AsyncClient,
        url: str,
        chunk: list[RewardInput],
        validation: bool,
        step: int,
        total_steps: int,
    ) -> list[RewardResult]:
        """One server's share, in requests of at most `reward.remote.max_request_bytes` (one after another)."""
        items = [inp.to_dict() for inp in chunk]
        sizes = [len(json.dumps(item).encode()) for item in items]
        limit = self.cfg.max_request_bytes - _PAYLOAD_OVERHEAD_BYTES
        results: list[RewardResult] = []
        for start, end in split_by_size(sizes, limit):
            if end - start == 1 and sizes[start] > limit:
                results += _all_failed(chunk[start:end], (
                    f"sample {chunk[start].uid!r} is {sizes[start]} bytes as JSON, more than a request may carry "
                    f"(reward.remote.max_request_bytes={self.cfg.max_request_bytes})"
                ))
                continue
            results += await self._post(http, url, chunk[start:end], items[start:end], validation, step, total_steps)
        return results

    async def _post(
        self,
        http: httpx.AsyncClient,
        url: str,
        chunk: list[RewardInput],
        items: list[dict],
        validation: bool,
        step: int,
        total_steps: int,
    ) -> list[RewardResult]:
        payload = {
            "inputs": items,
            "validation": validation,
            "step": step,
            "total_steps": total_steps,
        }
        try:
            response = await http.post(url + "/score", json=payload)
        except httpx.HTTPError as exc:
            return _all_failed(chunk, f"reward server {url} unreachable: {type(exc).__name__}: {exc}")
        if response.status_code != 200:
            return _all_failed(
                chunk, f"reward server {url} answered HTTP {response.status_code}: {response.text[:_ERROR_BODY_CHARS]}"
            )
        try:
            results = [RewardResult.from_dict(item) for item in response.json()["results"]]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return _all_failed(chunk, f"reward server {url} sent a malformed reply ({exc!r})")
        if len(results) != len(chunk):
            return _all_failed(chunk, f"reward server {url} returned {len(results)} results for {len(chunk)} samples")
        return results


def _all_failed(chunk: list[RewardInput], error: str) -> list[RewardResult]:
    logger.warning("%s (%d samples marked failed)", error, len(chunk))
    return [RewardResult(score=float("nan"), failed=True, metrics={}, error=error) for _ in chunk]
