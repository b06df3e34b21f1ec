"""Weight-sync throughput (GB/s) for a >= 500 MB Qwen2.5-VL, as a ratio to a plain in-memory copy of the same bytes.

Usage: python tools/bench/weight_sync.py [--hf-dir DIR] [--tp 2] [--bucket-mb 64] [--repeats 3] [--out-dir DIR]

Without --hf-dir a ~560 MB fp32 checkpoint (8 layers of width 1024, a 4-block vision tower) is generated.
Measured, each as the median of --repeats syncs, each against a memcpy of the same number of bytes (bucket by
bucket, `torch.Tensor.copy_`) timed in the same process just before:
    export            the actor at TP=--tp: all-gather of every tensor into HF-layout buckets (weights/export.py)
    broadcast         export + gloo broadcast of every bucket from actor rank 0 to another process
    broadcast+reload  the same, the receiving process loading each bucket into a running vLLM CPU engine
    colocated         policy and vLLM engine in one process (TP=1): export + in-place reload
Prints one line per path; docs/weights.md records the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ARCH = dict(hidden_size=1024, intermediate_size=4096, num_layers=8, num_heads=16, num_kv_heads=4,
            vision_depth=4, vision_hidden_size=512, vision_num_heads=8, vision_intermediate_size=2048,
            fullatt_block_indexes=(1, 3))


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


def make_exporter(model, hf_dir: str, bucket_mb: int):
    import torch

    from megatron_minio3.convert.qwen2_5_vl import detect_naming
    from megatron_minio3.convert.safetensors_io import SafetensorsReader
    from megatron_minio3.weights.export import WeightExporter

    with SafetensorsReader(hf_dir) as reader:
        naming = detect_naming(reader.names(), where=hf_dir)
    return WeightExporter(model, naming, bucket_bytes=bucket_mb << 20, dtype=torch.float32)


def measure(run, num_bytes: int, chunk_bytes: int, repeats: int) -> dict:
    """Median GB/s of run() and of a memcpy of the same bytes timed just before each run."""
    run_s, copy_s = [], []
    for _ in range(repeats):
        copy_s.append(memcpy_seconds(num_bytes, chunk_bytes))
        started = time.perf_counter()
        run()
        run_s.append(time.perf_counter() - started)
    gbps, copy_gbps = num_bytes / statistics.median(run_s) / 1e9, num_bytes / statistics.median(copy_s) / 1e9
    return {"gb": num_bytes / 1e9, "gb_per_s": gbps, "memcpy_gb_per_s": copy_gbps, "ratio": gbps / copy_gbps}


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
    results["broadcast"] = measure(lambda: sync_weights(exporter, targets), num_bytes, chunk, args.repeats)
    for _ in range(args.repeats):  # the receiver loads these into its engine and times them itself
        sync_weights(exporter, targets)
    dist.barrier()
    if ctx.rank == 0:
        Path(args.out_dir, "actor.json").write_text(json.dumps(results))
    destroy_parallel()


def role_receiver(args) -> None:
    """A vLLM engine process: receives --repeats syncs and drops them, then --repeats loaded into the engine."""
    from megatron_minio3.rollout.engine import VllmEngine
    from megatron_minio3.weights.sync import WeightGroup, receive_buckets, receive_weights

    engine = VllmEngine(engine_config(args.bucket_mb), args.hf_dir)
    group = WeightGroup("127.0.0.1", args.port, 1, 2)
    for _ in range(args.repeats):
        for _ in receive_buckets(group, engine.cfg.weight_bucket_mb << 20):
            pass
    runs = []
    for _ in range(args.repeats):
        stats = receive_weights(engine, group)
        copy_s = memcpy_seconds(stats.num_bytes, args.bucket_mb << 20)
        runs.append((stats.seconds, copy_s, stats.num_bytes))
    engine.shutdown()
    num_bytes = runs[0][2]
    gbps = num_bytes / statistics.median(r[0] for r in runs) / 1e9
    copy_gbps = num_bytes / statistics.median(r[1] for r in runs) / 1e9
    Path(args.out_dir, "receiver.json").write_text(json.dumps({"broadcast+reload": {
        "gb": num_bytes / 1e9, "gb_per_s": gbps, "memcpy_gb_per_s": copy_gbps, "ratio": gbps / copy_gbps}}))


def role_colocated(args) -> None:
    """One process (TP=1) holding the policy and a vLLM engine: export + in-place reload."""
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
    result = measure(lambda: sync_weights(exporter, targets), num_bytes, args.bucket_mb << 20, args.repeats)
    Path(args.out_dir, "colocated.json").write_text(json.dumps({"colocated": result}))
    engine.shutdown()
    destroy_parallel()


def run_roles(args) -> dict:
    from megatron_minio3.parallel import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    common = ["--hf-dir", args.hf_dir, "--out-dir", args.out_dir, "--bucket-mb", str(args.bucket_mb),
              "--repeats", str(args.repeats)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--master_addr", "127.0.0.1"]
    port = free_port()
    receiver = subprocess.Popen([sys.executable, __file__, "--role", "receiver", "--port", str(port), *common], env=env)
    try:
        subprocess.run([*torchrun, "--nproc_per_node", str(args.tp), "--master_port", str(free_port()), __file__,
                        "--role", "actor", "--tp", str(args.tp), "--port", str(port), *common], env=env, check=True)
        if receiver.wait() != 0:
            raise RuntimeError("the receiving engine process failed")
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    subprocess.run([*torchrun, "--nproc_per_node", "1", "--master_port", str(free_port()), __file__,
                    "--role", "colocated", *common], env=env, check=True)
    results = {}
    for name in ("actor", "receiver", "colocated"):
        results.update(json.loads(Path(args.out_dir, f"{name}.json").read_text()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", default="")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default="")
    parser.add_argument("--role", choices=("actor", "receiver", "colocated"), default=None)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    if args.role is not None:
        {"actor": role_actor, "receiver": role_receiver, "colocated": role_colocated}[args.role](args)
        return
    with tempfile.TemporaryDirectory(prefix="weight_sync_bench_") as tmp:
        args.out_dir = args.out_dir or tmp
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        if not args.hf_dir:
            from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import make_tiny_checkpoint

            args.hf_dir = str(make_tiny_checkpoint(Path(tmp) / "model", size="tiny", seed=0, **ARCH))
        results = run_roles(args)
    print(f"weight sync, {results['export']['gb']:.3f} GB fp32, buckets of {args.bucket_mb} MiB, actor TP={args.tp} "
          f"(colocated: TP=1), median of {args.repeats}")
    for name in ("export", "broadcast", "broadcast+reload", "colocated"):
        r = results[name]
        print(f"  {name:17s} {r['gb_per_s']:7.3f} GB/s   memcpy {r['memcpy_gb_per_s']:7.3f} GB/s   "
              f"ratio {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
