"""Ray worker groups: one Ray actor per Megatron rank, all joined in one torch.distributed world.

The controller calls a method on every rank at once (`group.call("step", batch)`) and gets the per-rank
results back in rank order. Each actor gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
before anything imports torch.distributed, so `megatron_minio3.parallel.init_parallel` works inside it
exactly as under torchrun. The rendezvous address is rank 0's node (its IP and a free port there), so ranks
may span nodes. `bundles` pins rank r to a placement-group bundle (workers/placement.py keeps a tensor-parallel
group and its engine inside one node that way).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from megatron_minio3.parallel import ParallelContext, free_port

SHUTDOWN_TIMEOUT_S = 30.0  # a rank still waiting in a collective for a dead one is killed after this


class RankWorker:
    """Base class of Megatron rank actors. Subclasses add the work (actor/ref steps, weight export)."""

    def __init__(self, rank: int, world_size: int, env: dict[str, str], local_rank: int):
        os.environ.update(env)
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(local_rank),
        )
        self.rank = rank
        self.ctx: ParallelContext | None = None

    def rendezvous_address(self, loopback: bool) -> tuple[str, int]:
        """Rank 0: this node's address and a free port on it, where the others meet."""
        import ray

        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        return host, free_port()

    def set_rendezvous(self, host: str, port: int) -> None:
        os.environ.update(MASTER_ADDR=host, MASTER_PORT=str(port))

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
        bundles: Sequence[tuple[Any, int]] | None = None,
    ):
        import ray

        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not ray.is_initialized():
            raise RuntimeError("ray.init() must be called before creating a WorkerGroup")
        if bundles is not None and len(bundles) != world_size:
            raise ValueError(f"need one placement bundle per rank: {world_size} ranks, {len(bundles)} bundles")
        env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        remote_cls = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)(worker_cls)
        self.world_size = world_size
        self.workers = []
        for rank in range(world_size):
            options = {}
            if bundles is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                group, index = bundles[rank]
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)
            # With GPUs each rank sees only its own device (Ray sets CUDA_VISIBLE_DEVICES): local rank 0.
            local_rank = 0 if num_gpus_per_worker else rank
            self.workers.append(remote_cls.options(**options).remote(rank, world_size, env, local_rank, *worker_args))
        try:
            host, port = ray.get(self.workers[0].rendezvous_address.remote(not num_gpus_per_worker))
            ray.get([w.set_rendezvous.remote(host, port) for w in self.workers])
        except BaseException:
            self.shutdown()
            raise

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

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """`shutdown` on every rank, then kill them all. A rank that does not answer within `timeout_s` (one still
        waiting in a collective for a rank that died) is killed without it; a failed rank's error is raised."""
        import ray

        try:
            refs = [w.shutdown.remote() for w in self.workers]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            ray.get(ready)
        finally:
            for worker in self.workers:
                ray.kill(worker)
            self.workers = []

