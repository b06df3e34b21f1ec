"""Where the actor ranks and the rollout engines run, and the calls that span both (`TrainingWorkers`).

trainer.rollout_placement
    hybrid    (default; the CPU setup) the engines live inside the actor's rank process: rollout and training
              take turns in one process, and a weight sync loads each exported bucket straight into the
              engines (weights.sync.InProcessTarget), no copy, no second process. vLLM then builds its
              parallel groups inside the actor's torch.distributed world; that is done (and tested) for a
              world of one only, so this placement takes exactly one actor rank (checked before anything
              starts).
    separate  `trainer.num_rollout_workers` RolloutWorker Ray actors hold the engines. After each update the
              actor's rank 0 broadcasts the buckets over a weight group (gloo on CPU, NCCL with CUDA) that the
              rollout workers joined at start; any TP x PP x DP layout of the actor.
A worker process that dies raises WorkerCrashed in the controller, naming the call it died in.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_minio3.config.schema import Config
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.rollout.agent_loop import RolloutBatch
from megatron_minio3.workers.group import WorkerGroup


class WorkerCrashed(RuntimeError):
    """A worker process died (killed, out of memory, segfault); the run cannot continue."""


def worker_env(cfg: Config) -> dict[str, str]:
    """Environment of every worker process: threads split over the host's cores, quiet vLLM."""
    num_processes = cfg.parallel.world_size + (
        cfg.trainer.num_rollout_workers if cfg.trainer.rollout_placement == "separate" else 0
    )
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    return {
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }


def _get(refs: list, what: str) -> list:
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayActorError as err:
        raise WorkerCrashed(f"a worker process died during {what}: {err}") from None


@dataclass
class TrainingWorkers:
    cfg: Config
    actors: WorkerGroup
    coords: list[dict]  # per actor rank: rank, tp/pp/cp/dp rank, writes_results
    rollout: list  # Ray handles offering generate / probe_rollout / evaluate (actor ranks or RolloutWorkers)
    rollout_workers: list = field(default_factory=list)  # separate placement

    # ---------------------------------------------------------------- actor calls

    def call(self, method: str, *args: Any) -> list:
        """`method` on every actor rank at once; results in rank order."""
        return _get([getattr(w, method).remote(*args) for w in self.actors.workers], f"actor.{method}")

    def call_per_dp_rank(self, method: str, per_dp_rank: Sequence[Any]) -> list:
        """`method(per_dp_rank[dp_rank])` on every rank (the object is stored once per data-parallel share)."""
        import ray

        refs = [ray.put(value) for value in per_dp_rank]
        calls = [getattr(w, method).remote(refs[c["dp_rank"]]) for w, c in zip(self.actors.workers, self.coords)]
        return _get(calls, f"actor.{method}")

    def results(self, per_rank: list) -> list:
        """The entries of the reporting ranks (one per data-parallel share), in dp order."""
        reporting = [(c["dp_rank"], r) for c, r in zip(self.coords, per_rank) if c["writes_results"]]
        return [r for _, r in sorted(reporting, key=lambda pair: pair[0])]

    # ---------------------------------------------------------------- rollout calls

    def generate(self, prompts: Sequence[Prompt], num_samples: int) -> RolloutBatch:
        """Prompts split evenly over the rollout handles; each prompt's samples come back consecutive."""
        shares = [list(prompts[i :: len(self.rollout)]) for i in range(len(self.rollout))]
        calls = [(h, s) for h, s in zip(self.rollout, shares) if s]
        batches = _get([h.generate.remote(s, num_samples) for h, s in calls], "rollout.generate")
        return RolloutBatch(
            trajectories=[traj for batch in batches for traj in batch.trajectories],
            skipped=[s for batch in batches for s in batch.skipped],
            wall_s=max(batch.wall_s for batch in batches),
        )

    def probe_rollout(self) -> list:
        return _get([self.rollout[0].probe_rollout.remote()], "rollout.probe_rollout")[0]

    def evaluate(self, output_dir: str) -> dict:
        """Avg@k on data.val_files on the first rollout handle's engines (trainer/eval.py)."""
        return _get([self.rollout[0].evaluate.remote(output_dir)], "rollout.evaluate")[0]

    def sync_weights(self) -> dict[str, float]:
        """Actor -> engines. Separate placement: the rollout workers receive while the actor ranks send."""
        receiving = [w.receive_weights.remote() for w in self.rollout_workers]
        sending = [w.sync_weights.remote() for w in self.actors.workers]
        stats = _get(sending + receiving, "weight sync")
        return stats[0]

    def shutdown(self) -> None:
        import ray

        for worker in self.rollout_workers:
            try:
                ray.get(worker.shutdown.remote())
            except ray.exceptions.RayError:
                pass
            ray.kill(worker)
        try:
            self.actors.shutdown()
        except ray.exceptions.RayError:  # a dead rank: kill the others
            for worker in self.actors.workers:
                ray.kill(worker)


def start_workers(
    cfg: Config, total_optimizer_steps: int, probe_prompts: Sequence[Prompt], seed_offset: int
) -> TrainingWorkers:
    """Start the actor ranks (and, for `separate`, the rollout workers) and build everything in them."""
    import ray

    from megatron_minio3.parallel import free_port
    from megatron_minio3.workers.actor_worker import ActorWorker
    from megatron_minio3.workers.rollout_worker import RolloutWorker

    on_gpu = _cuda_available()
    if on_gpu:  # Ray would wait forever for GPUs the cluster does not have
        needed = cfg.parallel.world_size + (
            cfg.trainer.num_rollout_workers * cfg.rollout.tensor_parallel_size
            if cfg.trainer.rollout_placement == "separate" else 0
        )
        available = ray.cluster_resources().get("GPU", 0)
        if needed > available:
            raise ValueError(
                f"the run needs {needed} GPUs (parallel: {cfg.parallel.world_size} actor ranks, plus rollout workers "
                f"with trainer.rollout_placement=separate) but the Ray cluster has {available:g}"
            )
    env = worker_env(cfg)
    actors = WorkerGroup(
        ActorWorker, cfg.parallel.world_size, num_cpus_per_worker=1, num_gpus_per_worker=1 if on_gpu else 0,
        env=env, worker_args=(cfg,),
    )
    rollout_workers = []
    if cfg.trainer.rollout_placement == "separate":
        remote = ray.remote(num_cpus=1, num_gpus=cfg.rollout.tensor_parallel_size if on_gpu else 0)(RolloutWorker)
        rollout_workers = [
            remote.remote(cfg, probe_prompts, seed_offset + 7919 * index, env)
            for index in range(cfg.trainer.num_rollout_workers)
        ]
    workers = TrainingWorkers(cfg, actors, [], [], rollout_workers)
    try:
        workers.coords = workers.call("setup", total_optimizer_steps, probe_prompts, seed_offset)
        if rollout_workers:
            host = ray.util.get_node_ip_address() if on_gpu else "127.0.0.1"
            port = free_port()
            size = 1 + len(rollout_workers)
            backend = "nccl" if on_gpu else "gloo"
            joins = [actors.workers[0].join_weight_group.remote(host, port, size, backend)]
            joins += [w.join_weight_group.remote(host, port, rank, size, backend)
                      for rank, w in enumerate(rollout_workers, start=1)]
            _get(joins, "weight group set-up")
            workers.rollout = rollout_workers
        else:
            workers.rollout = [
                w for w, c in zip(actors.workers, workers.coords) if c["tp_rank"] == c["pp_rank"] == c["cp_rank"] == 0
            ]
    except BaseException:
        workers.shutdown()
        raise
    return workers


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
