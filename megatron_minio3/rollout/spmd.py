"""One vLLM engine spanning R actor ranks (colocated rollout with rollout.tensor_parallel_size = R > 1).

vLLM's "external_launcher" executor lets every rank of an existing torch.distributed world run its own
LLMEngine over its tensor-parallel shard of the model; vLLM groups consecutive ranks into engines of R. The
ranks' schedulers then stay in step only if every rank makes the same engine calls in the same order. So
one rank, the leader, runs the agent loop and its engine thread publishes, before each `engine.step()`, the
requests it added and aborted since the last step; the other ranks (followers) apply the same calls and
step with it (`VllmEngine.follow`). Sampling is identical on every rank: the same seed, the same batches,
and logits gathered to every rank. A phase ends when the leader publishes END (`release_followers`).

Weight updates, cache resets and sleep/wake are per rank: every rank loads the full HF tensors of each
bucket and vLLM keeps its own shard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

END = ("end",)


@dataclass
class EngineGroup:
    """The R ranks of one engine: a gloo group for the leader's call lists (picklable objects)."""

    group: Any  # torch.distributed ProcessGroup (gloo) of the R ranks
    ranks: tuple[int, ...]  # global ranks, leader first

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def is_leader(self) -> bool:
        import torch.distributed as dist

        return dist.get_rank() == self.leader

    def publish(self, calls: list[tuple]) -> None:
        """Leader: send the engine calls the followers must make before the next step (or END)."""
        import torch.distributed as dist

        dist.broadcast_object_list([calls], src=self.leader, group=self.group)

    def receive(self) -> list[tuple]:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]


def build_engine_groups(world_size: int, ranks_per_engine: int, timeout_s: float = 1800) -> list[EngineGroup]:
    """Collective over the whole world (every rank calls it with the same arguments): one gloo group per
    engine, ranks [g*R, (g+1)*R). Returns every group (callers pick theirs by rank)."""
    import datetime

    import torch.distributed as dist

    groups = []
    for first in range(0, world_size, ranks_per_engine):
        ranks = tuple(range(first, first + ranks_per_engine))
        group = dist.new_group(list(ranks), backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        groups.append(EngineGroup(group, ranks))
    return groups
