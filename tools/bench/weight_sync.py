"""Weight-sync throughput (GB/s) for a >= 500 MB Qwen2.5-VL, each path as a ratio to a memcpy of the same bytes.

Usage: python tools/bench/weight_sync.py [--hf-dir DIR] [--tp 2] [--bucket-mb 64] [--repeats 5] [--out-dir DIR]
                                         [--paths separate,colocated,actor-rank]

Without --hf-dir a ~586 MB fp32 checkpoint (8 layers of width 1024, a 4-block vision tower) is generated.
Each path is timed --repeats times after one untimed warm-up, each run right after a memcpy of the same number
of bytes (bucket by bucket, `torch.Tensor.copy_` between two buffers whose pages are already mapped) in the
same process; a path's ratio is the median over its runs of memcpy seconds / path seconds.
    export             (separate) the actor at TP=--tp: all-gather of every tensor into flat HF buckets
    broadcast          (separate) export + gloo broadcast of every bucket from actor rank 0 to another process
    broadcast+reload   (separate) the same, the receiving process loading each bucket into a vLLM CPU engine
    colocated export   (colocated) TP=1, the export alone as the colocated sync runs it (views of the parameters)
    colocated          (colocated) policy and vLLM engine in one process, TP=1, --bucket-mb buckets:
                       export + VllmEngine.update_weights (vLLM reload_weights, tied lm_head repack, cache resets)
    actor rank         (actor-rank) the trainer's hybrid placement at TP=1: a MegatronActor (DDP, optimizer) and a
                       VllmEngine built as ActorWorker.setup builds them from configs/tiny_cpu.yaml (default
                       weights.bucket_mb / rollout.weight_bucket_mb), the worker's environment (workers.placement
                       .worker_env), synced as ActorWorker.sync_weights does
After the colocated runs, a breakdown of the colocated sync (median of --repeats more runs, with timers around
vLLM's reload_weights, its oneDNN weight repacking and our export): where the time goes, and the ratio vLLM's
reload alone would allow. docs/weights.md records the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ARCH = dict(hidden_size=1024, intermediate_size=4096, num_layers=8, num_heads=16, num_kv_heads=4,
            vision_depth=4, vision_hidden_size=512, vision_num_heads=8, vision_intermediate_size=2048,
            fullatt_block_indexes=(1, 3))
PATHS = ("separate", "colocated", "actor-rank")
LINES = ("export", "broadcast", "broadcast+reload", "colocated export", "colocated", "actor rank")


def memcpy_seconds(num_bytes: int, chunk_bytes: int) -> float:
    """Time to copy num_bytes from one host buffer into another, chunk by chunk."""
    import torch

    src = torch.ones(min(num_bytes, chunk_bytes) // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    started = time.perf_counter()
    remaining = num_bytes
    while remaining > 0:
        n = min(remaining, src.numel() * 4) // 4
        dst[:n].copy_(src[:n])
        remaining -= n * 4
    return time.perf_counter() - started


def engine_config(bucket_mb: int):
    from megatron_minio3.config.rollout import RolloutConfig

    return RolloutConfig(dtype="float32", kv_cache_memory_mb=256, enforce_eager=True, max_total_tokens=2048,
                         context_reserve_tokens=64, max_num_seqs=4, weight_bucket_mb=2 * bucket_mb)


def hf_naming(hf_dir: str):
    from megatron_minio3.convert.qwen2_5_vl import detect_naming
    from megatron_minio3.convert.safetensors_io import SafetensorsReader

    with SafetensorsReader(hf_dir) as reader:
        return detect_naming(reader.names(), where=hf_dir)


def make_exporter(model, hf_dir: str, bucket_mb: int):
    import torch

    from megatron_minio3.weights.export import WeightExporter

    return WeightExporter(model, hf_naming(hf_dir), bucket_bytes=bucket_mb << 20, dtype=torch.float32)


def summarize(runs: list[tuple[float, float]], num_bytes: int) -> dict:
    """runs: (path seconds, memcpy seconds) pairs."""
    return {
        "gb": num_bytes / 1e9,
        "gb_per_s": num_bytes / statistics.median(r for r, _ in runs) / 1e9,
        "memcpy_gb_per_s": num_bytes / statistics.median(c for _, c in runs) / 1e9,
        "ratio": statistics.median(c / r for r, c in runs),
        "runs_s": [round(r, 4) for r, _ in runs],
    }


def measure(run, num_bytes: int, chunk_bytes: int, repeats: int, warmup: bool = True) -> dict:
    """run() timed `repeats` times, each right after a memcpy of the same bytes."""
    if warmup:
        run()
    runs = []
    for _ in range(repeats):
        copy_s = memcpy_seconds(num_bytes, chunk_bytes)
        started = time.perf_counter()
        run()
        runs.append((time.perf_counter() - started, copy_s))
    return summarize(runs, num_bytes)


def role_actor(args) -> None:
    """torchrun worker at TP=--tp: export alone, then syncs to the receiver (which drops, then loads)."""
    import torch.distributed as dist

    from megatron_minio3.models.qwen2_5_vl.model import ModelOptions
    from megatron_minio3.parallel import destroy_parallel, init_parallel
    from megatron_minio3.weights.sync import BroadcastTarget, WeightGroup, sync_weights
    from megatron_minio3.workers.actor.actor import build_model_from_hf

    ctx = init_parallel(tp=args.tp, pp=1)
    model = build_model_from_hf(args.hf_dir, ModelOptions(use_te=False))
    exporter = make_exporter(model, args.hf_dir, args.bucket_mb)
    num_bytes = sum(plan.numel for plan in exporter.plan()) * 4
    chunk = args.bucket_mb << 20
    results = {"export": measure(lambda: sync_weights(exporter, []), num_bytes, chunk, args.repeats)}
    group = WeightGroup("127.0.0.1", args.port, 0, 2) if ctx.rank == 0 else None
    targets = [BroadcastTarget(group)] if group else []
    # the receiver drops the warm-up and these; each is a collective with it
    results["broadcast"] = measure(lambda: sync_weights(exporter, targets), num_bytes, chunk, args.repeats)
    for _ in range(1 + args.repeats):  # the receiver loads these into its engine (warm-up + timed) and times them
        sync_weights(exporter, targets)
    dist.barrier()
    if ctx.rank == 0:
        Path(args.out_dir, "actor.json").write_text(json.dumps(results))
    destroy_parallel()


def role_receiver(args) -> None:
    """A vLLM engine process: receives 1 + --repeats syncs and drops them, then 1 + --repeats loaded into the
    engine (the first of each untimed)."""
    from megatron_minio3.rollout.engine import VllmEngine
    from megatron_minio3.weights.sync import WeightGroup, receive_buckets, receive_weights

    engine = VllmEngine(engine_config(args.bucket_mb), args.hf_dir)
    group = WeightGroup("127.0.0.1", args.port, 1, 2)
    for _ in range(1 + args.repeats):
        for _ in receive_buckets(group, engine.cfg.weight_bucket_mb << 20):
            pass
    receive_weights(engine, group)  # warm-up
    runs, num_bytes = [], 0
    for _ in range(args.repeats):
        stats = receive_weights(engine, group)
        runs.append((stats.seconds, memcpy_seconds(stats.num_bytes, args.bucket_mb << 20)))
        num_bytes = stats.num_bytes
    engine.shutdown()
    Path(args.out_dir, "receiver.json").write_text(json.dumps({"broadcast+reload": summarize(runs, num_bytes)}))


# ------------------------------------------------------------------------------- where the colocated time goes


class Timers:
    """Wall time inside a few functions (any thread), patched in for the breakdown runs only."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner, attr: str, key: str) -> bool:
        function = getattr(owner, attr, None)
        if function is None:  # another vLLM version: that line of the breakdown stays empty
            return False

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - started

        setattr(owner, attr, timed)
        return True

    def timed_iter(self, iterable, key: str):
        iterator = iter(iterable)
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                self.seconds[key] += time.perf_counter() - started
                return
            self.seconds[key] += time.perf_counter() - started
            yield item


def colocated_breakdown(exporter, engine, targets, repeats: int) -> dict:
    """Median seconds per sync of: the whole sync, our export (making the buckets), VllmEngine.update_weights,
    vLLM's reload_weights inside it, the CPU GEMM weight repacking (oneDNN) inside that; and minor page faults."""
    import vllm.v1.worker.gpu_model_runner as model_runner
    from vllm.model_executor.layers import utils as layer_utils
    from vllm.model_executor.model_loader.reload import inplace, layerwise

    from megatron_minio3.weights.sync import sync_weights

    timers = Timers()
    timers.wrap(model_runner, "reload_weights", "vllm reload_weights")  # what GPUModelRunner.reload_weights calls
    timers.wrap(layer_utils, "dispatch_cpu_unquantized_gemm", "vllm oneDNN repack")  # imported at each call
    timers.wrap(layerwise, "_layerwise_process", "vllm layer processing")  # materialise, load, repack, copy back
    timers.wrap(inplace, "initialize_layerwise_reload", "vllm per-call walks")  # every module, every call
    timers.wrap(inplace, "finalize_layerwise_reload", "vllm per-call walks")
    timers.wrap(engine, "update_weights", "engine update_weights")
    buckets = exporter.buckets
    exporter.buckets = lambda **kw: timers.timed_iter(buckets(**kw), "our export")
    runs: dict[str, list[float]] = defaultdict(list)
    try:
        for _ in range(repeats):
            timers.seconds.clear()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            started = time.perf_counter()
            sync_weights(exporter, targets)
            runs["sync"].append(time.perf_counter() - started)
            runs["minor page faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
            for key, seconds in timers.seconds.items():
                runs[key].append(seconds)
    finally:
        del exporter.buckets
    return {key: statistics.median(values) for key, values in runs.items()}


def role_colocated(args) -> None:
    """One process (TP=1) holding the policy and a vLLM engine: the export alone, export + in-place reload,
    then the breakdown."""
    from megatron_minio3.models.qwen2_5_vl.model import ModelOptions
    from megatron_minio3.parallel import destroy_parallel, init_parallel
    from megatron_minio3.rollout.engine import VllmEngine
    from megatron_minio3.weights.sync import InProcessTarget, sync_weights
    from megatron_minio3.workers.actor.actor import build_model_from_hf

    init_parallel(tp=1, pp=1)
    model = build_model_from_hf(args.hf_dir, ModelOptions(use_te=False))
    exporter = make_exporter(model, args.hf_dir, args.bucket_mb)
    engine = VllmEngine(engine_config(args.bucket_mb), args.hf_dir)
    num_bytes = sum(plan.numel for plan in exporter.plan()) * 4
    targets = [InProcessTarget(engine)]
    chunk = args.bucket_mb << 20

    def export_as_colocated() -> None:  # what sync_weights asks for with this target
        views = getattr(InProcessTarget, "accepts_views", False)
        for bucket in exporter.buckets(views=True) if views else exporter.buckets():
            bucket.named_tensors()

    results = {
        "colocated export": measure(export_as_colocated, num_bytes, chunk, args.repeats),
        "colocated": measure(lambda: sync_weights(exporter, targets), num_bytes, chunk, args.repeats),
    }
    # The engine copies what it loads: no vLLM tensor may share memory with the policy's parameters.
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared = engine._call(lambda e: e.collective_rpc(_storages_in, args=(params,)))
    if any(shared):
        raise AssertionError(f"vLLM tensors alias the policy's parameters: {shared}")
    breakdown = colocated_breakdown(exporter, engine, targets, args.repeats)
    breakdown["memcpy"] = statistics.median(memcpy_seconds(num_bytes, chunk) for _ in range(args.repeats))
    results["breakdown"] = breakdown
    Path(args.out_dir, "colocated.json").write_text(json.dumps(results))
    engine.shutdown()
    destroy_parallel()


def _storages_in(worker, storages: set[int]) -> list[str]:
    """Names of the engine's parameters and buffers whose storage is one of `storages` (runs in the worker)."""
    model = worker.model_runner.get_model()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.numel() and t.untyped_storage().data_ptr() in storages]


def role_actor_rank(args) -> None:
    """The trainer's hybrid placement at TP=1, built as ActorWorker.setup does, synced as its sync_weights."""
    from megatron_minio3.config import load_config
    from megatron_minio3.parallel import destroy_parallel, init_parallel
    from megatron_minio3.rollout.engine import VllmEngine
    from megatron_minio3.weights.export import WeightExporter, resolve_export_dtype
    from megatron_minio3.weights.sync import InProcessTarget, sync_weights
    from megatron_minio3.workers.actor.actor import MegatronActor

    cfg = load_config(REPO_ROOT / "configs/tiny_cpu.yaml", [f"model={args.hf_dir}"])
    init_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp, seed=cfg.trainer.seed)
    actor = MegatronActor.from_hf(cfg.model, cfg.actor, cfg.algorithm, total_optimizer_steps=1,
                                  temperature=cfg.rollout.temperature)
    exporter = WeightExporter(actor.module, hf_naming(cfg.model), bucket_bytes=cfg.weights.bucket_mb << 20,
                              dtype=resolve_export_dtype(cfg.weights.dtype, cfg.rollout.dtype, cfg.model))
    exporter.plan()
    engine = VllmEngine(cfg.rollout, cfg.model, max_images=cfg.rollout.max_images)
    num_bytes = sum(plan.numel for plan in exporter.plan()) * exporter.dtype.itemsize
    targets = [InProcessTarget(engine)]
    result = measure(lambda: sync_weights(exporter, targets), num_bytes, cfg.weights.bucket_mb << 20, args.repeats)
    result.update(bucket_mb=cfg.weights.bucket_mb, engine_bucket_mb=cfg.rollout.weight_bucket_mb,
                  num_buckets=len(exporter.plan()), omp_threads=os.environ.get("OMP_NUM_THREADS", ""))
    Path(args.out_dir, "actor_rank.json").write_text(json.dumps({"actor rank": result}))
    engine.shutdown()
    destroy_parallel()


ROLES = {"actor": role_actor, "receiver": role_receiver, "colocated": role_colocated, "actor-rank": role_actor_rank}


def run_roles(args) -> dict:
    from megatron_minio3.config import load_config
    from megatron_minio3.parallel import free_port
    from megatron_minio3.workers.placement import worker_env

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    common = ["--hf-dir", args.hf_dir, "--out-dir", args.out_dir, "--bucket-mb", str(args.bucket_mb),
              "--repeats", str(args.repeats)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--master_addr", "127.0.0.1",
                "--nproc_per_node"]
    paths = args.paths.split(",")
    outputs = []
    if "separate" in paths:
        port = free_port()
        receiver = subprocess.Popen([sys.executable, __file__, "--role", "receiver", "--port", str(port), *common],
                                    env=env)
        try:
            subprocess.run([*torchrun, str(args.tp), "--master_port", str(free_port()), __file__,
                            "--role", "actor", "--tp", str(args.tp), "--port", str(port), *common], env=env, check=True)
            if receiver.wait() != 0:
                raise RuntimeError("the receiving engine process failed")
        finally:
            if receiver.poll() is None:
                receiver.kill()
                receiver.wait()
        outputs += ["actor", "receiver"]
    if "colocated" in paths:
        subprocess.run([*torchrun, "1", "--master_port", str(free_port()), __file__, "--role", "colocated", *common],
                       env=env, check=True)
        outputs.append("colocated")
    if "actor-rank" in paths:
        rank_env = {**env, **worker_env(load_config(REPO_ROOT / "configs/tiny_cpu.yaml", [f"model={args.hf_dir}"]))}
        subprocess.run([*torchrun, "1", "--master_port", str(free_port()), __file__, "--role", "actor-rank", *common],
                       env=rank_env, check=True)
        outputs.append("actor_rank")
    results = {}
    for name in outputs:
        results.update(json.loads(Path(args.out_dir, f"{name}.json").read_text()))
    return results


def report(results: dict, args) -> str:
    gb = next(r["gb"] for name, r in results.items() if name in LINES)
    lines = [f"weight sync, {gb:.3f} GB fp32, buckets of {args.bucket_mb} MiB, actor TP={args.tp} (colocated: TP=1), "
             f"median of {args.repeats} after a warm-up; ratio = median(memcpy s / path s), same bytes, same process"]
    for name in LINES:
        if name in results:
            r = results[name]
            extra = ""
            if name == "colocated export" and r["ratio"] > 1:
                extra = "   (views of the parameters: only q/k/v parts are copied)"
            if name == "actor rank":
                extra = (f"   (trainer config: {r['num_buckets']} buckets of {r['bucket_mb']} MiB, engine reload size "
                         f"{r['engine_bucket_mb']} MiB, OMP_NUM_THREADS={r['omp_threads']})")
            lines.append(f"  {name:17s} {r['gb_per_s']:7.3f} GB/s   memcpy {r['memcpy_gb_per_s']:7.3f} GB/s   "
                         f"ratio {r['ratio']:.3f}{extra}")
    b = results.get("breakdown")
    if b:
        sync = b["sync"]
        reload_s = b.get("vllm reload_weights", 0.0)
        repack = b.get("vllm oneDNN repack", 0.0)
        export = b.get("our export", 0.0)
        engine_ours = b.get("engine update_weights", 0.0) - reload_s
        rest = sync - export - b.get("engine update_weights", 0.0)
        lines.append(f"colocated sync breakdown (timers on, median of {args.repeats}): {sync:.3f} s per sync, "
                     f"memcpy of the same bytes {b['memcpy']:.3f} s")
        lines.append(f"  vLLM reload_weights            {reload_s:7.3f} s  {100 * reload_s / sync:5.1f} %   "
                     f"(of which CPU GEMM weight repacking (oneDNN) {repack:.3f} s, {100 * repack / sync:.1f} %)")
        if "vllm layer processing" in b and "vllm per-call walks" in b:
            layers = b["vllm layer processing"] - repack
            walks = b["vllm per-call walks"]
            other = reload_s - b["vllm layer processing"] - walks
            lines.append(f"    inside it: repacking {repack:.3f} s, the rest of the per-module processing "
                         f"(materialise, load copies, copy back) {layers:.3f} s, per-call walks over every module "
                         f"{walks:.3f} s, loaders' Python and per-call checks {other:.3f} s")
        lines.append(f"  our export (buckets)           {export:7.3f} s  {100 * export / sync:5.1f} %")
        lines.append(f"  our engine side (tied lm_head repack, cache resets, thread hand-offs) "
                     f"{engine_ours:.3f} s  {100 * engine_ours / sync:.1f} %")
        lines.append(f"  our sync loop, the rest        {rest:7.3f} s  {100 * rest / sync:5.1f} %")
        lines.append(f"  minor page faults per sync     {b['minor page faults']:.0f}")
        if reload_s > 0:
            lines.append(f"  ceiling with vLLM's reload alone (our side free): ratio {b['memcpy'] / reload_s:.3f}; "
                         f"with the repacking alone: {b['memcpy'] / max(repack, 1e-9):.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", default="")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out-dir", default="")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--role", choices=tuple(ROLES), default=None)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.role is not None:
        ROLES[args.role](args)
        return
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown:
        parser.error(f"unknown --paths {sorted(unknown)}; choose from {','.join(PATHS)}")
    with tempfile.TemporaryDirectory(prefix="weight_sync_bench_") as tmp:
        args.out_dir = args.out_dir or tmp
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        if not args.hf_dir:
            from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import make_tiny_checkpoint

            args.hf_dir = str(make_tiny_checkpoint(Path(tmp) / "model", size="tiny", seed=0, **ARCH))
        results = run_roles(args)
    print(report(results, args))


if __name__ == "__main__":
    main()
