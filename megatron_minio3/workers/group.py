"""Ray worker groups: one Ray actor per Megatron rank, all joined in one torch.distributed world.

The controller calls a method on every rank at once (`group.call("step", batch)`) and gets the per-rank
results back in rank order. Each actor gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
before anything imports torch.distributed, so `megatron_minio3.parallel.init_parallel` works inside it
exactly as under torchrun.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from megatron_minio3.parallel import ParallelContext, free_port


class RankWorker:
    """Base class of Megatron rank actors. Subclasses add the work (actor/ref steps, weight export)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, env: dict[str, str]):
        os.environ.update(env)
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        self.rank = rank
        self.ctx: ParallelContext | None = None

    def init_parallel(self, tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234) -> dict:
        from megatron_minio3.parallel import init_parallel

        self.ctx = init_parallel(tp=tp, pp=pp, cp=cp, seed=seed)
        return {k: getattr(self.ctx, k) for k in ("rank", "tp_rank", "pp_rank", "cp_rank", "dp_rank")}

    def shutdown(self) -> None:
        from megatron_minio3.parallel import destroy_parallel

        destroy_parallel()


class WorkerGroup:
    """`world_size` Ray actors of `worker_cls` (a RankWorker subclass) on the current Ray cluster."""

    def __init__(
        self,
        worker_cls: type[RankWorker],
        world_size: int,
        *,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float = 0,
        env: dict[str, str] | None = None,
        worker_args: Sequence[Any] = (),
    ):
        import ray

        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not ray.is_initialized():
            raise RuntimeError("ray.init() must be called before creating a WorkerGroup")
        # CPU runs are single-host (loopback); GPU runs rendezvous on the driver node's address.
        master_addr = ray.util.get_node_ip_address() if num_gpus_per_worker else "127.0.0.1"
        master_port = free_port()
        env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        remote_cls = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)(worker_cls)
        self.world_size = world_size
        self.workers = [
            remote_cls.remote(rank, world_size, master_addr, master_port, env, *worker_args)
            for rank in range(world_size)
        ]

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Runs `method` on every rank concurrently; returns the results in rank order."""
        import ray

        return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def call_per_rank(self, method: str, per_rank_args: Sequence[tuple]) -> list[Any]:
        """Like `call`, with its own positional arguments for each rank (e.g. that rank's data shard)."""
        import ray

        if len(per_rank_args) != self.world_size:
            raise ValueError(f"need arguments for {self.world_size} ranks, got {len(per_rank_args)}")
        return ray.get([getattr(w, method).remote(*a) for w, a in zip(self.workers, per_rank_args)])

    def shutdown(self) -> None:
        import ray

        try:
            self.call("shutdown")
        finally:
            for worker in self.workers:
                ray.kill(worker)
            self.workers = []
