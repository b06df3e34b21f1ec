"""Where the actor ranks and the rollout engines run, and the typed calls a step makes on them.

trainer.rollout_placement
    hybrid    (the default; colocated) the engines live inside the actor rank processes: one rollout handle
              (a RolloutRuntime with rollout.num_engines engines) per group of R = rollout.tensor_parallel_size
              consecutive ranks, on those ranks' devices, so rollout data-parallelism is world / R. Rollout and
              training take turns in each process (memory moves between phases, workers/actor_worker.py) and a
              weight sync loads every exported bucket straight into the local engine, in place.
    separate  `trainer.num_rollout_workers` RolloutWorker Ray actors hold the engines on devices of their own;
              after each update the actor's rank 0 broadcasts the buckets over a weight group (gloo on CPU,
              NCCL with CUDA) that they joined at start.

`TrainingWorkers` is what the controller sees: methods, not strings, and no data. Trajectories, pixels and
packed batches move between workers as Ray object refs: a rollout handle returns one object per
data-parallel rank from `take_training_shares`, and those refs are passed to the actor ranks' `train`,
so Ray copies them from the handle to the ranks directly; the driver holds refs, plans and metrics only.

With CUDA the actor ranks are pinned to placement-group bundles, one placement group per node
(STRICT_PACK), ranks filling nodes in order: a tensor-parallel group and an engine's R ranks are consecutive
ranks, so they stay inside a node whenever they divide cluster.gpus_per_node (checked before launch,
trainer/launch_plan.py). A worker process that dies raises WorkerCrashed in the controller, naming the call.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from megatron_minio3.config.schema import Config
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.trainer.step_plan import RoundSummary, SeqKey, StepPlan
from megatron_minio3.weights.probe import ProbeSequence
from megatron_minio3.workers.group import SHUTDOWN_TIMEOUT_S, WorkerGroup


class RolloutHandle(Protocol):
    """The methods of a rollout handle (an engine-leading ActorWorker in hybrid placement, a RolloutWorker in
    separate placement) that TrainingWorkers calls through Ray; both classes implement them."""

    def generate_round(self, prompts: Sequence[Prompt], step: int, seeds: Sequence[int] | None = None,
                       next_round: tuple[Sequence[Prompt], Sequence[int]] | None = None) -> RoundSummary: ...

    def end_generation(self) -> None: ...

    def take_training_shares(self, requests: Sequence[Sequence[SeqKey]]) -> Any: ...  # one value per dp rank

    def probe_rollout(self) -> list[list[ProbeSequence]]: ...

    def evaluate(self, output_dir: str, step: int) -> dict: ...


def round_shares(rollout_seed: int, prompts: Sequence[Prompt], step: int, round_index: int,
                 next_prompts: Sequence[Prompt] | None, num_handles: int) -> list[tuple]:
    """generate_round's arguments for each rollout handle: (its prompts, step, their seeds, the next round's
    (prompts, seeds) or None). Prompts are dealt out in turn; every prompt's sampling seed comes from its place in
    the round before the split (rollout/seeds.py), so the same round gives the same samples on any number of
    handles."""
    from megatron_minio3.rollout.seeds import round_prompt_seeds

    seeds = round_prompt_seeds(rollout_seed, step, round_index, [p.uid for p in prompts])
    upcoming = [None] * num_handles
    if next_prompts is not None:
        next_seeds = round_prompt_seeds(rollout_seed, step, round_index + 1, [p.uid for p in next_prompts])
        upcoming = [(list(next_prompts[i::num_handles]), next_seeds[i::num_handles]) for i in range(num_handles)]
    return [(list(prompts[i::num_handles]), step, seeds[i::num_handles], upcoming[i]) for i in range(num_handles)]


class WorkerCrashed(RuntimeError):
    """A worker process died (killed, out of memory, segfault); the run cannot continue."""


class LaunchRefused(ValueError):
    """The Ray cluster cannot hold the run (found before any worker starts); the message says what is missing."""


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


def engine_handles(world_size: int, ranks_per_engine: int) -> list[int]:
    """Per actor rank (hybrid placement): the rollout handle whose engine it holds a part of. Engine g spans
    ranks [g*R, (g+1)*R) and is led by its first rank."""
    if world_size % ranks_per_engine:
        raise ValueError(f"rollout.tensor_parallel_size ({ranks_per_engine}) must divide the actor's {world_size} ranks")
    return [rank // ranks_per_engine for rank in range(world_size)]


def _get(refs: list, what: str) -> list:
    """ray.get of every ref, failing as soon as any of them fails (not in list order: the ranks that wait for a
    dead one in a collective would otherwise be waited for first)."""
    import ray

    try:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # raises the failure of this one now
        return ray.get(refs)
    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as err:
        raise WorkerCrashed(f"a worker process died during {what}: {_describe(err)}") from None
    except ray.exceptions.RayTaskError:
        dead = _death_among(refs)  # a rank whose collective broke because another rank died: report the death
        if dead is not None:
            raise WorkerCrashed(f"a worker process died during {what}: {_describe(dead)}") from None
        raise


def _death_among(refs: list, wait_s: float = 10.0) -> BaseException | None:
    """The first RayActorError among `refs` once they have settled (at most `wait_s`), or None."""
    import ray

    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as err:
            return err
        except ray.exceptions.RayError:
            continue
    return None


def _describe(err: BaseException) -> str:
    """The first line of a Ray error, with the class and pid of the actor when Ray names them."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    details = [line for line in lines[1:] if line.startswith(("class_name:", "pid:"))]
    return " ".join(lines[:1] + details) if lines else type(err).__name__


def required_resources(cfg: Config, on_gpu: bool) -> dict[str, float]:
    """Ray resources the run's actors ask for: one CPU (and with CUDA one GPU) per actor rank, one CPU (and R GPUs)
    per separate rollout worker."""
    workers = cfg.trainer.num_rollout_workers if cfg.trainer.rollout_placement == "separate" else 0
    needed = {"CPU": float(cfg.parallel.world_size + workers)}
    if on_gpu:
        needed["GPU"] = float(cfg.parallel.world_size + workers * cfg.rollout.tensor_parallel_size)
    return needed


def _shortfall(needed: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    return {name: amount for name, amount in needed.items() if have.get(name, 0.0) < amount}


def check_cluster_resources(cfg: Config, on_gpu: bool, wait_s: float | None = None) -> None:
    """LaunchRefused when the Ray cluster has fewer CPUs/GPUs in total than the run's actors ask for (Ray would wait
    for them forever), or when they stay taken by others for `wait_s` (default PLACEMENT_TIMEOUT_S)."""
    import time

    import ray

    needed = required_resources(cfg, on_gpu)
    total = ray.cluster_resources()
    what = (f"parallel: {cfg.parallel.world_size} actor ranks (tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x cp "
            f"{cfg.parallel.cp} x dp {cfg.parallel.dp})")
    if cfg.trainer.rollout_placement == "separate":
        what += f" + trainer.num_rollout_workers={cfg.trainer.num_rollout_workers}"
    missing = _shortfall(needed, total)
    if missing:
        asked = ", ".join(f"{needed[k]:g} {k}s" for k in missing)
        has = ", ".join(f"{total.get(k, 0.0):g} {k}s" for k in missing)
        raise LaunchRefused(f"the run needs {asked} ({what}, one each) but the Ray cluster has {has}; shrink the "
                            "layout or add resources to the cluster (ray start ... --num-cpus/--num-gpus)")
    deadline = time.monotonic() + (PLACEMENT_TIMEOUT_S if wait_s is None else wait_s)
    waiting = False
    while _shortfall(needed, ray.available_resources()):
        if time.monotonic() > deadline:
            free = ray.available_resources()
            raise LaunchRefused(f"the run needs {needed} ({what}) but only {({k: free.get(k, 0.0) for k in needed})} "
                                "stayed free in the Ray cluster (other jobs hold the rest)")
        if not waiting:
            print(f"waiting for {needed} to be free in the Ray cluster ...", flush=True)
            waiting = True
        time.sleep(1.0)


@dataclass
class TrainingWorkers:
    cfg: Config
    actors: WorkerGroup
    coords: list[dict]  # per actor rank: rank, tp/pp/cp/dp rank, writes_results
    rollout: list  # Ray handles of RolloutHandle: engine-leading actor ranks (hybrid) or RolloutWorkers (separate)
    rollout_workers: list = field(default_factory=list)  # separate placement
    followers: list = field(default_factory=list)  # hybrid, R > 1: the other ranks of each handle's engine
    follower_handles: list = field(default_factory=list)  # the handle each follower belongs to
    # trainer.overlap_rounds: the followers follow a step's whole generation (their `follow` calls, in flight from
    # the step's first round until end_generation), since a round started early runs between the driver's calls
    _following: list | None = None

    def _on_handles(self, method: str, per_handle_args: Sequence[tuple]) -> list:
        """`method` on every rollout handle (its own arguments each); the ranks that share a handle's engine
        follow it meanwhile. Returns the handles' results in order."""
        calls = [getattr(h, method).remote(*args) for h, args in zip(self.rollout, per_handle_args)]
        following = [w.follow.remote(method) for w in self.followers]
        return _get(calls + following, f"rollout.{method}")[: len(calls)]

    def _on_actors(self, method: str, *args: Any) -> list:
        return _get([getattr(w, method).remote(*args) for w in self.actors.workers], f"actor.{method}")

    # ---------------------------------------------------------------- a step

    def generate_round(self, prompts: Sequence[Prompt], step: int, round_index: int = 0,
                       next_prompts: Sequence[Prompt] | None = None) -> list[RoundSummary]:
        """Prompts split evenly over the rollout handles (round_shares); each returns the summaries of its
        groups. `next_prompts` (trainer.overlap_rounds): the next round, which the handles may start early."""
        shares = round_shares(self.cfg.rollout.seed, prompts, step, round_index, next_prompts, len(self.rollout))
        if not self.cfg.trainer.overlap_rounds:
            return self._on_handles("generate_round", shares)
        if self._following is None:
            self._following = [w.follow.remote("generate_round") for w in self.followers]
        return _get([h.generate_round.remote(*args) for h, args in zip(self.rollout, shares)], "rollout.generate_round")

    def end_generation(self) -> None:
        """The step's generation is over: every handle drops a round it started early (overlap_rounds) and releases
        the ranks following its engine."""
        _get([h.end_generation.remote() for h in self.rollout], "rollout.end_generation")
        following, self._following = self._following or [], None
        _get(following, "rollout.generate_round (following)")

    def train(self, plan: StepPlan) -> dict[str, float]:
        """Every handle sends each data-parallel rank its sequences (object refs, never through here); every
        actor rank trains on its share. Returns the step's actor/* and timing metrics."""
        import ray

        dp = self.cfg.parallel.dp
        per_handle = []
        for index, handle in enumerate(self.rollout):
            refs = handle.take_training_shares.options(num_returns=dp).remote(plan.requests(index, dp))
            per_handle.append([refs] if dp == 1 else list(refs))
        plan_ref = ray.put(plan)
        calls = [w.train.remote(plan_ref, *[refs[c["dp_rank"]] for refs in per_handle])
                 for w, c in zip(self.actors.workers, self.coords)]
        return train_metrics(_get(calls, "actor.train"), plan)

    def sync_weights(self) -> dict[str, float]:
        """Actor -> engines; separate placement: the rollout workers receive while the actor ranks send."""
        receiving = [w.receive_weights.remote() for w in self.rollout_workers]
        sending = [w.sync_weights.remote() for w in self.actors.workers]
        per_rank = _get(sending + receiving, "weight sync")[: len(sending)]
        metrics = {k: v for k, v in per_rank[0].items() if not k.startswith("memory/")}
        for report in per_rank:  # the worst rank's peak memory of each phase
            for key, value in report.items():
                if key.startswith("memory/"):
                    metrics[key] = max(metrics.get(key, 0.0), value)
        return metrics

    def probe(self) -> dict[str, float]:
        """Every engine's greedy probe sequences, scored by the actor (weights/probe.py)."""
        from megatron_minio3.weights.probe import engine_probe_metrics

        sequences = [h.probe_rollout.remote() for h in self.rollout]  # refs: the sequences hold images
        _get([w.follow.remote("probe_rollout") for w in self.followers], "rollout.probe_rollout")
        per_engine = {}
        for report in self._on_actors("score_probe", *sequences):
            per_engine.update(report)
        return engine_probe_metrics(per_engine, self.cfg.weights.probe_warn_mean_abs_diff)

    def evaluate(self, output_dir: str, step: int) -> dict:
        """Avg@k on data.val_files on the first rollout handle's engines (trainer/eval.py) after `step`."""
        calls = [self.rollout[0].evaluate.remote(output_dir, step)]
        calls += [w.follow.remote("evaluate") for w, handle in zip(self.followers, self.follower_handles) if handle == 0]
        return _get(calls, "rollout.evaluate")[0]

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: str) -> list[dict]:
        return self._on_actors("save_checkpoint", directory)

    def load_checkpoint(self, directory: str) -> list[dict]:
        return self._on_actors("load_checkpoint", directory)

    def shutdown(self) -> None:
        import ray

        for worker in self.rollout_workers:
            try:  # bounded: a worker may still wait in a weight broadcast for an actor rank that died
                ray.get(worker.shutdown.remote(), timeout=SHUTDOWN_TIMEOUT_S)
            except (ray.exceptions.RayError, TimeoutError):
                pass
            ray.kill(worker)
        try:
            self.actors.shutdown()
        except ray.exceptions.RayError:  # a dead rank: kill the others
            for worker in self.actors.workers:
                ray.kill(worker)


def train_metrics(reports: Sequence[dict], plan: StepPlan) -> dict[str, float]:
    """The step's actor metrics from every rank's `ActorWorker.train` report: update metrics from the reporting
    ranks (already reduced over data-parallel ranks), log-prob differences summed over them, timings of the
    slowest rank."""
    reporting = [r for r in reports if r["writes_results"]]
    updates = reporting[0]["updates"]
    diff = {name: [r["logprob_diff"][name] for r in reporting] for name in ("abs_diff_sum", "abs_diff_max", "num_tokens")}
    metrics = {
        "actor/num_updates": float(len(updates)),
        "actor/num_sequences": float(plan.num_sequences),
        "actor/num_loss_tokens": float(plan.num_loss_tokens),
        "actor/rollout_logprob_diff": sum(diff["abs_diff_sum"]) / max(sum(diff["num_tokens"]), 1.0),
        "actor/rollout_logprob_diff_max": max(diff["abs_diff_max"]),
    }
    if updates:
        for name in updates[0]:
            metrics[f"actor/{name}"] = sum(u[name] for u in updates) / len(updates)
        metrics["actor/grad_norm_max"] = max(u["grad_norm"] for u in updates)
        metrics["actor/lr"] = updates[-1]["lr"]
    for phase in {phase for r in reports for phase in r["timing"]}:
        metrics[f"timing/{phase}_s"] = max(r["timing"].get(phase, 0.0) for r in reports)
    return metrics


def start_workers(cfg: Config, total_optimizer_steps: int, probe_prompts: Sequence[Prompt]) -> TrainingWorkers:
    """Start the actor ranks (and, for `separate`, the rollout workers) and build everything in them."""
    import ray

    from megatron_minio3.parallel import free_port
    from megatron_minio3.workers.actor_worker import ActorWorker
    from megatron_minio3.workers.rollout_worker import RolloutWorker

    on_gpu = _cuda_available()
    hybrid = cfg.trainer.rollout_placement == "hybrid"
    check_cluster_resources(cfg, on_gpu)  # Ray would wait forever for resources the cluster does not have
    env = worker_env(cfg)
    actors = WorkerGroup(
        ActorWorker, cfg.parallel.world_size, num_cpus_per_worker=1, num_gpus_per_worker=1 if on_gpu else 0,
        env=env, worker_args=(cfg,), bundles=node_bundles(cfg) if on_gpu else None,
    )
    handles = engine_handles(cfg.parallel.world_size, cfg.rollout.tensor_parallel_size) if hybrid else []
    rollout_workers = []
    if not hybrid:
        remote = ray.remote(num_cpus=1, num_gpus=cfg.rollout.tensor_parallel_size if on_gpu else 0)(RolloutWorker)
        rollout_workers = [
            remote.remote(cfg, probe_prompts, index, env) for index in range(cfg.trainer.num_rollout_workers)
        ]
    workers = TrainingWorkers(cfg, actors, [], [], rollout_workers)
    try:
        workers.coords = _get(
            [w.setup.remote(total_optimizer_steps, probe_prompts, handles[rank] if hybrid else None)
             for rank, w in enumerate(actors.workers)], "actor.setup",
        )
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
            leads = [rank % cfg.rollout.tensor_parallel_size == 0 for rank in range(cfg.parallel.world_size)]
            workers.rollout = [w for w, lead in zip(actors.workers, leads) if lead]
            workers.followers = [w for w, lead in zip(actors.workers, leads) if not lead]
            workers.follower_handles = [h for h, lead in zip(handles, leads) if not lead]
    except BaseException:
        workers.shutdown()
        raise
    return workers


def node_bundles(cfg: Config) -> list[tuple[Any, int]]:
    """One STRICT_PACK placement group per node of one GPU (and one CPU) per actor rank; rank r goes to node
    r // gpus_per_node, bundle r % gpus_per_node. Waits until the groups are placed."""
    import ray
    from ray.util.placement_group import placement_group

    per_node = cfg.cluster.gpus_per_node
    world = cfg.parallel.world_size
    groups = [
        placement_group([{"GPU": 1, "CPU": 1}] * min(per_node, world - first), strategy="STRICT_PACK")
        for first in range(0, world, per_node)
    ]
    try:
        ray.get([group.ready() for group in groups], timeout=PLACEMENT_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        nodes = [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]]
        raise LaunchRefused(
            f"could not place {world} actor ranks as {len(groups)} node(s) of up to {per_node} GPUs "
            f"(cluster.gpus_per_node) within {PLACEMENT_TIMEOUT_S} s; the Ray cluster's nodes have {nodes} GPUs: start "
            "the missing nodes (ray start --address=HEAD:6379) or match cluster.* to the machines"
        ) from None
    return [(groups[rank // per_node], rank % per_node) for rank in range(world)]


PLACEMENT_TIMEOUT_S = 300


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
