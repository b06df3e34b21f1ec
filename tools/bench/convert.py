"""Conversion throughput and peak memory, as ratios of the checkpoint size, on a locally generated checkpoint.

Usage: python tools/bench/convert.py [--work-dir DIR] [--num-layers 4] [--vocab-size 64000] [--keep]

Writes a random bf16 Qwen2.5-VL checkpoint in the released layout (3B-like widths: hidden 2048, FFN 11008,
16 heads / 2 KV heads, a vision tower of --vision-depth blocks; about 1.5 GB with the defaults, sharded
with an index), then runs the real tools as subprocesses:
    HF -> Megatron at TP=1 (one process) and at TP=2 (torchrun, two processes),
    Megatron (written at TP=2) -> HF with two --bucket-size values,
checks that the exported tensors equal the original ones, and prints one line per run: throughput
(checkpoint GB per second) and the peak resident memory (total RSS, file-backed pages included) of the
largest process, as a multiple of the checkpoint size and of the largest per-rank output (the bytes one rank
writes: its __<rank>_*.distcp files, plus .metadata/common.pt/metadata.json for rank 0; for Megatron -> HF,
one process, everything it writes), both in total and above the import baseline (the RSS of a process that
only imports python + torch + megatron, a constant that does not grow with the model). "private" excludes
file-backed pages. Memory is sampled every 20 ms with psutil over the whole process tree.

Acceptance (issue 11): HF -> Megatron peak RSS <= 1.2 x the largest per-rank output at TP=1 and TP=2, in
total RSS (the strict reading) or, for checkpoints so small that the start-up dominates, above the import
baseline; the last lines say which holds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS = REPO_ROOT / "tools"


def bench_config(args: argparse.Namespace) -> dict:
    """config.json in the released (flat) layout."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": args.num_layers,
        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": args.vocab_size,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "max_position_embeddings": 128000, "torch_dtype": "bfloat16",
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": args.vision_depth, "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "out_hidden_size": 2048, "fullatt_block_indexes": [1],
                          "window_size": 112, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "in_chans": 3, "hidden_act": "silu"},
    }


def write_checkpoint(hf_dir: Path, config: dict) -> int:
    """Random bf16 tensors for every name the conversion rules expect; returns the total bytes."""
    from megatron_minio3.convert.qwen2_5_vl import RELEASED, checkpoint_rules
    from megatron_minio3.convert.safetensors_io import StreamingSafetensorsWriter, TensorSpec
    from megatron_minio3.models.qwen2_5_vl.config import parse_hf_config

    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    specs = [
        TensorSpec(name, shape, torch.bfloat16)
        for rule in checkpoint_rules(parse_hf_config(config), RELEASED)
        for name, shape in zip(rule.hf_names, rule.hf_shapes())
    ]
    writer = StreamingSafetensorsWriter(hf_dir, specs, max_shard_bytes=512 * 1024**2)
    generator = torch.Generator().manual_seed(0)
    for spec in specs:
        writer.write(spec.name, (torch.randn(spec.shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    return writer.total_bytes


@dataclass
class RunResult:
    seconds: float
    peak_rss: int  # largest single process
    peak_private: int  # largest single process, without file-backed pages


def measure(cmd: list[str]) -> RunResult:
    """Runs cmd, sampling the RSS of its process tree until it exits; raises with its output on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peaks = {"rss": 0, "private": 0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                for process in [root, *root.children(recursive=True)]:
                    info = process.memory_info()
                    peaks["rss"] = max(peaks["rss"], info.rss)
                    peaks["private"] = max(peaks["private"], info.rss - info.shared)
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-6000:]}")
    return RunResult(seconds, peaks["rss"], peaks["private"])


ACCEPTED_RATIO = 1.2  # peak RSS / largest per-rank output


def largest_rank_output(out_dir: Path) -> int:
    """Bytes written by the rank that writes the most: a Megatron checkpoint's __<rank>_<i>.distcp files per rank
    (rank 0 also writes the other files); any other directory (HF export, one process) counts as one rank."""
    per_rank: dict[int, int] = {}
    for path in out_dir.iterdir():
        if not path.is_file():
            continue
        parts = path.name.split("_")
        rank = int(parts[2]) if path.suffix == ".distcp" and path.name.startswith("__") else 0
        per_rank[rank] = per_rank.get(rank, 0) + path.stat().st_size
    return max(per_rank.values())


def report(label: str, result: RunResult, size: int, baseline: RunResult, out_dir: Path) -> tuple[float, float]:
    """Prints one line; returns (peak RSS, peak RSS above the import baseline) / the largest per-rank output."""
    gb = 1e9
    rank_output = largest_rank_output(out_dir)
    above = (result.peak_rss - baseline.peak_rss) / rank_output
    print(
        f"{label:<44} {size / gb:.2f} GB in {result.seconds:6.1f} s = {size / gb / result.seconds:.3f} GB/s; "
        f"peak RSS {result.peak_rss / gb:.2f} GB = {result.peak_rss / size:.2f} x checkpoint "
        f"(private {result.peak_private / size:.2f} x); largest rank output {rank_output / gb:.2f} GB: peak RSS "
        f"{result.peak_rss / rank_output:.2f} x of it, above import baseline {above:.2f} x",
        flush=True,
    )
    return result.peak_rss / rank_output, above


def tensors_equal(a_dir: Path, b_dir: Path) -> bool:
    from megatron_minio3.convert.safetensors_io import SafetensorsReader

    with SafetensorsReader(a_dir) as a, SafetensorsReader(b_dir) as b:
        return sorted(a.names()) == sorted(b.names()) and all(
            a.dtype(n) == b.dtype(n) and torch.equal(a.read(n), b.read(n)) for n in a.names()
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=None, help="default: a temporary directory, removed at the end")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=64000)
    parser.add_argument("--vision-depth", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        hf_dir = work / "hf"
        start = time.perf_counter()
        size = write_checkpoint(hf_dir, bench_config(args))
        print(f"generated {size / 1e9:.2f} GB bf16 checkpoint in {time.perf_counter() - start:.1f} s at {hf_dir}")
        if size < 1e9:
            print("warning: checkpoint under 1 GB; raise --num-layers or --vocab-size")

        python = sys.executable
        baseline = measure([python, "-c", "import megatron_minio3.convert.hf_to_megatron"])
        print(f"{'import baseline (python+torch+megatron)':<44} {baseline.seconds:.1f} s, peak RSS "
              f"{baseline.peak_rss / 1e9:.2f} GB (every run below includes this start-up)")
        to_megatron = measure([python, str(TOOLS / "convert_hf_to_megatron.py"), "--hf-dir", str(hf_dir),
                               "--out-dir", str(work / "megatron_tp1")])
        ratios = {"TP=1": report("HF -> Megatron, TP=1 (1 process)", to_megatron, size, baseline,
                                 work / "megatron_tp1")}
        to_megatron_tp2 = measure([python, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                   "--master_port", str(29500 + os.getpid() % 1000),
                                   str(TOOLS / "convert_hf_to_megatron.py"), "--hf-dir", str(hf_dir),
                                   "--out-dir", str(work / "megatron_tp2"), "--tp", "2"])
        ratios["TP=2"] = report("HF -> Megatron, TP=2 (2 processes, per process)", to_megatron_tp2, size, baseline,
                                work / "megatron_tp2")
        for bucket in ("1GiB", "256MiB"):
            out = work / f"hf_from_tp2_{bucket}"
            to_hf = measure([python, str(TOOLS / "convert_megatron_to_hf.py"), "--megatron-dir",
                             str(work / "megatron_tp2"), "--out-dir", str(out), "--hf-config-dir", str(hf_dir),
                             "--bucket-size", bucket, "--max-shard-size", "512MiB"])
            report(f"Megatron (TP=2) -> HF, --bucket-size {bucket}", to_hf, size, baseline, out)
            if not tensors_equal(hf_dir, out):
                raise SystemExit(f"exported tensors differ from the original ({out})")
        print("round trip HF -> Megatron (TP=2) -> HF: all tensors bit-identical")
        for layout, (total, above) in ratios.items():
            verdict = ("ok in total RSS" if total <= ACCEPTED_RATIO else
                       "ok above the import baseline only" if above <= ACCEPTED_RATIO else "ABOVE THE LIMIT")
            print(f"acceptance, HF -> Megatron {layout}: peak RSS = {total:.2f} x the largest per-rank output, "
                  f"{above:.2f} x above the import baseline (limit {ACCEPTED_RATIO} x): {verdict}")
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
