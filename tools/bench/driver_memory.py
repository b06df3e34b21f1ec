"""Peak resident memory of the GRPO driver at 8 and at 64 trajectories per step, with large raw images.

Usage: python tools/bench/driver_memory.py [--trajectories 8,64] [--n 4] [--width 2400 --height 1800]
                                           [--max-turns 3] [--max-pixels 50176] [--dynamic-sampling]
                                           [--top 0] [--keep DIR]

The controller only sees numbers (RoundSummary, StepPlan); trajectories and their images stay in the rollout
handles and travel to the actor ranks as Ray object refs (docs/design.md). So the driver's memory must not
grow with the number of images per step. This benchmark runs one real GRPO step on CPU (the generated tiny
checkpoint, real vLLM CPU, Megatron on gloo, a local Ray cluster, one actor rank with its engine, hybrid
placement) at each trajectory count, on a synthetic visual-search dataset whose RAW images are large while
data.max_pixels keeps the model-side images (and the token counts) small. Each turn is constrained by a regex
to think, then zoom into the original image or answer, so trajectories hold crops as well.

Each run is `python -m megatron_minio3.trainer.grpo` in a subprocess (this file with --child, which calls
trainer.grpo.main()); that process is the driver, and at exit it reports its own figures from
/proc/self/status (Ray workers are other processes and do not count):
  lifetime peak   VmHWM over the whole process (imports, Ray start, workers' set-up, the step, shut-down);
  step peak       VmHWM reset (/proc/self/clear_refs) when GRPOTrainer.fit starts, read when it returns;
  RSS at fit      VmRSS when fit starts (workers up, nothing generated yet);
  Python heap     tracemalloc's peak of the allocations made during fit (the driver's Python objects).
(getrusage's ru_maxrss is not used: after fork+exec it starts from the forking parent's peak, here this
benchmark's own process, which is larger than the driver.)
The image bytes a step's trajectories hold are estimated from the dataset's image size and the crop count in
metrics.jsonl: raw prompt images (one per prompt, shared by its n samples) + raw crops (the regex's boxes
averaged over equally likely digits) + the model-side copies of both. That is what the driver would have
grown by had the trajectories passed through it. Workers' peaks (memory/*_peak_rss_gb) are printed for context.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MARK = "DRIVER_MEMORY "

# Think, then zoom into the original image (box corners in [0.0, 0.4] x [0.5, 0.9]) or answer a letter
# (tests/integration/test_grpo_cpu.py).
TOOL_REGEX = (
    r"<think>[a-z ]{1,6}</think>("
    r'<grounding>\{"bbox_2d": \[0\.[0-4], 0\.[0-4], 0\.[5-9], 0\.[5-9]\], "source": "original_image"\}</grounding>'
    r"|<answer>\([A-D]\)</answer>)"
)
LOW_DIGITS, HIGH_DIGITS = range(0, 5), range(5, 10)  # the regex's box corners, tenths


# ---------------------------------------------------------------------------------------------- the driver


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(argv: list[str]) -> int:
    """The driver: trainer.grpo.main(argv), with memory marks around GRPOTrainer.fit; reports them at exit."""
    import resource
    import tracemalloc

    from megatron_minio3.trainer import grpo
    from megatron_minio3.workers.memory import reset_peak_resident

    top = int(os.environ.get("DRIVER_MEMORY_TOP", "0"))
    marks: dict = {}
    original_fit = grpo.GRPOTrainer.fit

    def fit(self) -> None:
        marks["rss_at_fit_kib"] = _status_kib("VmRSS")
        marks["hwm_before_fit_kib"] = _status_kib("VmHWM")
        marks["hwm_reset"] = reset_peak_resident()
        tracemalloc.start(25 if top else 1)
        try:
            original_fit(self)
        finally:
            marks["step_hwm_kib"] = _status_kib("VmHWM")
            marks["rss_after_fit_kib"] = _status_kib("VmRSS")
            current, peak = tracemalloc.get_traced_memory()
            marks["py_heap_after_fit"] = current
            marks["py_heap_peak_fit"] = peak
            if top:
                stats = tracemalloc.take_snapshot().statistics("traceback")[:top]
                marks["py_heap_top"] = [  # innermost frames first, frozen (importlib, abc) ones left out
                    {"bytes": s.size, "count": s.count,
                     "where": [f"{f.filename}:{f.lineno}" for f in reversed(s.traceback) if not f.filename.startswith("<")]}
                    for s in stats
                ]
            tracemalloc.stop()

    grpo.GRPOTrainer.fit = fit
    code = grpo.main(argv)
    marks["hwm_at_exit_kib"] = _status_kib("VmHWM")
    marks["rss_at_exit_kib"] = _status_kib("VmRSS")
    marks["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    marks["exit_code"] = code
    # The lifetime peak: the larger of the peak before the reset and the one since.
    marks["lifetime_hwm_kib"] = max(marks.get("hwm_before_fit_kib", 0), marks["hwm_at_exit_kib"])
    print(MARK + json.dumps(marks), flush=True)
    return code


# ---------------------------------------------------------------------------------------------- estimates


def image_estimate(model_dir: Path, width: int, height: int, min_pixels: int, max_pixels: int) -> dict[str, float]:
    """Bytes (RGB, 3 per pixel) of a prompt image and of the average crop, raw and model-side (Mini-o3's resize
    then the processor's smart_resize, as AgentLoop.model_image), the crop box averaged over the regex's digits."""
    from megatron_minio3.rollout.crop_tool import crop_box_pixels, scale_to_pixel_range, smart_resize
    from megatron_minio3.rollout.tokens import load_vision_spec

    vision = load_vision_spec(model_dir)

    def model_pixels(size: tuple[int, int]) -> int:
        w, h = scale_to_pixel_range(size, min_pixels, max_pixels)
        h, w = smart_resize(h, w, factor=vision.patch_size * vision.merge_size,
                            min_pixels=vision.min_pixels, max_pixels=vision.max_pixels)
        return w * h

    raw, model = [], []
    for x0, y0, x1, y1 in itertools.product(LOW_DIGITS, LOW_DIGITS, HIGH_DIGITS, HIGH_DIGITS):
        left, top, right, bottom = crop_box_pixels((x0 / 10, y0 / 10, x1 / 10, y1 / 10), (width, height))
        size = (right - left, bottom - top)
        raw.append(size[0] * size[1])
        model.append(model_pixels(size))
    return {
        "prompt_raw": 3.0 * width * height,
        "prompt_model": 3.0 * model_pixels((width, height)),
        "crop_raw": 3.0 * sum(raw) / len(raw),
        "crop_model": 3.0 * sum(model) / len(model),
    }


def step_images(metrics: dict, train_batch_size: int, per_image: dict[str, float]) -> dict[str, float]:
    """Images of the step's trajectories and their bytes, from the step's metrics. A tool call adds a crop unless
    it failed (tool error) or cut the trajectory (exceed: turn/image/context limit, the crop is not appended)."""
    num_traj = metrics["rollout/num_trajectories"]
    num_prompts = metrics["sampling/num_rounds"] * train_batch_size - metrics.get("rollout/num_skipped_prompts", 0.0)
    num_crops = num_traj * (metrics["rollout/num_tool_calls_mean"] - metrics["rollout/num_tool_errors_mean"]
                            - metrics["rollout/exceed_rate"])
    num_crops = max(0.0, round(num_crops))
    raw = num_prompts * per_image["prompt_raw"] + num_crops * per_image["crop_raw"]
    model = num_prompts * per_image["prompt_model"] + num_crops * per_image["crop_model"]
    return {"prompts": num_prompts, "crops": num_crops, "images": num_prompts + num_crops,
            "images_per_trajectory": (num_traj + num_crops) / max(num_traj, 1),
            "raw_bytes": raw, "model_bytes": model, "bytes": raw + model}


# ---------------------------------------------------------------------------------------------- one run


def overrides(args, model: Path, data: Path, out: Path, train_batch_size: int) -> list[str]:
    settings = {
        "model": str(model),
        "data.train_files": f"[{data}]",
        "data.max_pixels": args.max_pixels,
        "rollout.n": args.n,
        "rollout.max_turns": args.max_turns,
        "rollout.max_tokens_per_turn": 96,
        "rollout.max_total_tokens": 2048,
        "rollout.context_reserve_tokens": 128,
        "rollout.kv_cache_memory_mb": 256,
        "rollout.max_num_seqs": 64,
        "rollout.guided_regex": f"'{TOOL_REGEX}'",
        "actor.packing.max_tokens_per_microbatch": 2048,
        "actor.ppo_mini_batch_size": train_batch_size,  # one optimizer step
        "algorithm.dynamic_sampling": "true" if args.dynamic_sampling else "false",
        "reward.verifiers": "{synthetic_visual_search: mc}",
        "trainer.output_dir": str(out),
        "trainer.train_batch_size": train_batch_size,
        "trainer.total_steps": 1,
        "trainer.save_every": 0,
        "weights.probe_every": 0,  # no parity probe: nothing but the step
    }
    if args.dynamic_sampling:  # the round cap is a dynamic-sampling key (refused without it)
        settings["trainer.max_generation_rounds"] = 4
    return [f"{key}={value}" for key, value in settings.items()]


def run_step(args, model: Path, data: Path, work: Path, num_trajectories: int) -> dict:
    if num_trajectories % args.n:
        raise SystemExit(f"--trajectories: {num_trajectories} is not a multiple of --n {args.n}")
    train_batch_size = num_trajectories // args.n
    out = work / f"run_{num_trajectories}"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--config",
               str(REPO_ROOT / "configs/tiny_cpu.yaml"), *overrides(args, model, data, out, train_batch_size)]
    env = {**os.environ, "DRIVER_MEMORY_TOP": str(args.top), "PYTHONPATH": str(REPO_ROOT)}
    log = work / f"run_{num_trajectories}.log"
    for attempt in range(3):  # a busy machine can make Ray's own start time out; nothing of ours ran then
        started = time.monotonic()
        with log.open("w") as handle:
            result = subprocess.run(command, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, text=True,
                                    env=env, timeout=args.timeout)
        wall = time.monotonic() - started
        text = log.read_text()
        if result.returncode == 0 or "timed out during startup" not in text:
            break
        print(f"  Ray's start timed out (machine busy, load {os.getloadavg()[0]:.1f}); again in 30 s", flush=True)
        time.sleep(30)
    lines = [line for line in text.splitlines() if line.startswith(MARK)]
    if result.returncode != 0 or not lines:
        tail = "\n".join(text.splitlines()[-60:])
        raise SystemExit(f"the run at {num_trajectories} trajectories failed (exit {result.returncode}); log {log}:\n{tail}")
    from megatron_minio3.trainer.logging import read_metrics

    steps = [r for r in read_metrics(out / "metrics.jsonl") if "event" not in r]
    assert len(steps) == 1, steps
    return {"driver": json.loads(lines[-1][len(MARK):]), "metrics": steps[0], "wall_s": wall,
            "train_batch_size": train_batch_size, "log": str(log)}


# ---------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", default="8,64", help="trajectories per step (train_batch_size x n)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (rollout.n)")
    parser.add_argument("--width", type=int, default=2400, help="raw image size of the synthetic dataset")
    parser.add_argument("--height", type=int, default=1800)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--max-pixels", type=int, default=50176, help="data.max_pixels (model-side images)")
    parser.add_argument("--dynamic-sampling", action="store_true",
                        help="keep algorithm.dynamic_sampling on (more generation rounds; default off: exactly "
                             "the requested trajectories)")
    parser.add_argument("--top", type=int, default=0, help="print the driver's N largest Python allocations "
                                                          "left after the step (tracemalloc)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--keep", default="", help="work directory to keep (default: a temporary one)")
    return parser.parse_args()


def gb(kib: float) -> float:
    return kib * 1024 / 1e9


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child(sys.argv[2:]))
    args = parse_args()
    from megatron_minio3.config import load_config
    from megatron_minio3.data.synthetic import VisualSearchSpec, write_visual_search_dataset
    from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import make_tiny_checkpoint

    sizes = [int(s) for s in args.trajectories.split(",")]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_driver_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_tiny_checkpoint(work / "ckpt", size="tiny", seed=0)
    num_prompts = max(sizes) // args.n
    spec = VisualSearchSpec(width=args.width, height=args.height, question_kinds=("mc",))  # the regex answers letters
    data = write_visual_search_dataset(work / "data", num_prompts, seed=0, spec=spec)
    min_pixels = load_config(REPO_ROOT / "configs/tiny_cpu.yaml", []).data.min_pixels
    per_image = image_estimate(model, args.width, args.height, min_pixels, args.max_pixels)

    runs = {}
    for size in sizes:
        print(f"running one GRPO step at {size} trajectories ({size // args.n} prompts x {args.n}) ...", flush=True)
        runs[size] = run_step(args, model, data, work, size)
        runs[size]["images"] = step_images(runs[size]["metrics"], runs[size]["train_batch_size"], per_image)

    mb = 1e6
    print(f"\ntiny checkpoint, {num_prompts} prompts of {args.width}x{args.height} raw images "
          f"({per_image['prompt_raw'] / mb:.1f} MB raw, {per_image['prompt_model'] / 1e3:.0f} kB model-side each; "
          f"average crop {per_image['crop_raw'] / mb:.2f} MB raw, {per_image['crop_model'] / 1e3:.0f} kB model-side), "
          f"rollout.n={args.n}, max_turns={args.max_turns}, data.max_pixels={args.max_pixels}, "
          f"dynamic_sampling={'on' if args.dynamic_sampling else 'off'}, 1 actor rank (hybrid) | "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    header = (f"{'trajectories':>12} {'generated':>9} {'images':>6} {'crops':>5} {'img MB/step':>11} "
              f"{'driver peak GB':>14} {'step peak GB':>12} {'RSS@fit GB':>10} {'py heap peak MB':>15} "
              f"{'wall s':>6}")
    print("(images: distinct images held, a prompt's image shared by its samples, plus the crops; img MB: their raw +\n"
          " model-side bytes; driver peak: VmHWM of the driver process; step peak: VmHWM from the start of fit;\n"
          " py heap: tracemalloc peak of the driver's Python allocations during fit)")
    print(header)
    for size, run in runs.items():
        d, m, im = run["driver"], run["metrics"], run["images"]
        print(f"{size:>12} {m['rollout/num_trajectories']:>9.0f} {im['images']:>6.0f} {im['crops']:>5.0f} "
              f"{im['bytes'] / mb:>11.1f} {gb(d['lifetime_hwm_kib']):>14.3f} {gb(d['step_hwm_kib']):>12.3f} "
              f"{gb(d['rss_at_fit_kib']):>10.3f} {d['py_heap_peak_fit'] / mb:>15.2f} {run['wall_s']:>6.0f}")
    for size, run in runs.items():
        m, im = run["metrics"], run["images"]
        memory = ", ".join(f"{k.removeprefix('memory/')} {v:.2f}" for k, v in sorted(m.items())
                           if k.startswith("memory/"))
        print(f"  {size} trajectories: {m['sampling/num_rounds']:.0f} round(s), {im['prompts']:.0f} prompts, "
              f"tool calls/trajectory {m['rollout/num_tool_calls_mean']:.2f} (errors {m['rollout/num_tool_errors_mean']:.2f}, "
              f"exceed rate {m['rollout/exceed_rate']:.2f}), {im['images_per_trajectory']:.2f} images/trajectory, "
              f"sequence length {m['rollout/sequence_length_mean']:.0f}, trained {m.get('actor/num_sequences', 0):.0f} "
              f"sequences; image bytes raw {im['raw_bytes'] / mb:.1f} MB + model {im['model_bytes'] / mb:.1f} MB; "
              f"workers' peak RSS (GB, worst rank): {memory}; driver hwm reset at fit: {run['driver']['hwm_reset']}")
    small, large = runs[min(sizes)], runs[max(sizes)]
    ratios = {}
    for name, key in (("driver lifetime peak", "lifetime_hwm_kib"), ("driver step peak", "step_hwm_kib")):
        a, b = gb(small["driver"][key]), gb(large["driver"][key])
        ratios[name] = b / a
        print(f"  {name}: {b:.3f} GB at {max(sizes)} vs {a:.3f} GB at {min(sizes)}: "
              f"difference {(b - a) * 1e3:+.1f} MB, ratio {b / a:.3f}")
    heap_a, heap_b = small["driver"]["py_heap_peak_fit"], large["driver"]["py_heap_peak_fit"]
    print(f"  driver Python heap peak during the step: {heap_b / mb:.2f} MB vs {heap_a / mb:.2f} MB: "
          f"difference {(heap_b - heap_a) / mb:+.2f} MB")
    grow = large["images"]["bytes"] - small["images"]["bytes"]
    print(f"  the trajectories' images: {large['images']['bytes'] / mb:.1f} MB vs {small['images']['bytes'] / mb:.1f} MB "
          f"per step: through the driver, its peak would have grown by ~{grow / mb:.0f} MB (more with pickling copies)")
    if args.top:
        for size, run in runs.items():
            print(f"  largest Python allocations left in the driver after the step at {size}:")
            for stat in run["driver"].get("py_heap_top", []):
                print(f"    {stat['bytes'] / 1e3:9.1f} kB in {stat['count']} blocks: {' <- '.join(stat['where'][:3])}")
    print(json.dumps({
        str(size): {"driver_lifetime_peak_gb": gb(run["driver"]["lifetime_hwm_kib"]),
                    "driver_step_peak_gb": gb(run["driver"]["step_hwm_kib"]),
                    "driver_py_heap_peak_mb": run["driver"]["py_heap_peak_fit"] / mb,
                    "num_trajectories": run["metrics"]["rollout/num_trajectories"],
                    "num_images": run["images"]["images"], "image_mb": run["images"]["bytes"] / mb,
                    **{k: v for k, v in run["metrics"].items() if k.startswith("memory/")}}
        for size, run in runs.items()
    } | {"ratios": ratios}))


if __name__ == "__main__":
    main()
