"""Does GRPO learn? The demo pipeline with one SFT start and several GRPO seeds, longer GRPO.

Usage: python tools/bench/learning.py [--seeds 1,2,3] [--steps 12] [--out outputs/learning]
                                      [--config configs/demo_cpu.yaml] [key=value ...]

1. `examples/run_demo.sh` up to the SFT model (outputs/demo: checkpoint, data, oracle, SFT, its evaluation);
   a finished demo is reused as it is.
2. For each seed: GRPO from the SFT model with trainer.seed = rollout.seed = SEED (the prompt order and every
   sampling stream differ) for --steps steps, export to HF, evaluate on the held-out set (the evaluation's
   sampling seeded alike, so the SFT start is evaluated with each seed too).
3. Prints accuracy (Avg@k over the held-out questions) of the SFT start and after GRPO per seed and per
   difficulty, the gain of each seed, the mean gain and the spread (max - min) of the GRPO accuracies across
   seeds, and whether the mean gain exceeds that spread. Everything is written to OUT/summary.json.

Extra key=value arguments go to every GRPO and evaluation run. Each stage is skipped when its output exists.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "outputs" / "demo"


def run(cmd: list[str], log: Path) -> None:
    started = time.monotonic()
    print(f"$ {' '.join(cmd)}  (log: {log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        code = subprocess.call(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"failed with status {code} after {time.monotonic() - started:.0f} s: see {log}")
    print(f"  done in {time.monotonic() - started:.0f} s", flush=True)


def accuracy(eval_dir: Path) -> dict[str, float]:
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    k = metrics["k"]
    return {source: row[f"avg@{k}"] for source, row in metrics["per_source"].items()}


def evaluate(config: str, model: Path, out: Path, seed: int, extra: list[str]) -> dict[str, float]:
    if not (out / "metrics.json").is_file():
        run([sys.executable, "-m", "megatron_minio3.trainer.eval", "--config", config, f"model={model}",
             f"eval.output_dir={out}", f"rollout.seed={seed}", *extra], out.with_suffix(".log"))
    return accuracy(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=12)  # the demo runs 8
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "learning")
    parser.add_argument("--config", default="configs/demo_cpu.yaml")
    args, extra = parser.parse_known_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    python = sys.executable
    sft_model = DEMO / "sft" / "hf"
    if not (sft_model / "config.json").is_file():
        env = {**os.environ, "PYTHON": python, "DEMO_STOP_AFTER": "sft"}
        print("running examples/run_demo.sh up to the SFT model ...", flush=True)
        code = subprocess.call(["bash", "examples/run_demo.sh"], cwd=REPO, env=env)
        if code:
            sys.exit(f"examples/run_demo.sh failed with status {code}")
    results = {"seeds": seeds, "steps": args.steps, "extra": extra, "sft": {}, "grpo": {}}
    for seed in seeds:
        results["sft"][seed] = evaluate(args.config, sft_model, args.out / f"eval_sft_seed{seed}", seed, extra)
        run_dir = args.out / f"grpo_seed{seed}"
        hf = run_dir / "hf"
        if not (hf / "config.json").is_file():
            run([python, "-m", "megatron_minio3.trainer.grpo", "--config", args.config, f"model={sft_model}",
                 f"trainer.output_dir={run_dir}", f"trainer.total_steps={args.steps}",
                 f"trainer.save_every={args.steps}", f"trainer.seed={seed}", f"rollout.seed={seed}", *extra],
                run_dir.with_suffix(".log"))
            last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
            run([python, "tools/convert_megatron_to_hf.py", "--megatron-dir", str(last / "model"),
                 "--hf-config-dir", str(sft_model), "--out-dir", str(hf)], run_dir.with_suffix(".convert.log"))
        results["grpo"][seed] = evaluate(args.config, hf, args.out / f"eval_grpo_seed{seed}", seed, extra)

    sources = sorted(results["sft"][seeds[0]], key=lambda s: (s == "all", s))
    print(f"\naccuracy on the held-out set (Avg@k), GRPO {args.steps} steps from one SFT start:")
    print(f"{'data source':34s} {'SFT (mean)':>10s} " + " ".join(f"{'GRPO s' + str(s):>9s}" for s in seeds)
          + f" {'gain':>7s} {'spread':>7s}")
    for source in sources:
        sft = statistics.mean(results["sft"][s][source] for s in seeds)
        grpo = [results["grpo"][s][source] for s in seeds]
        print(f"{source:34s} {sft:10.3f} " + " ".join(f"{g:9.3f}" for g in grpo)
              + f" {statistics.mean(grpo) - sft:+7.3f} {max(grpo) - min(grpo):7.3f}")
    sft_all = [results["sft"][s]["all"] for s in seeds]
    grpo_all = [results["grpo"][s]["all"] for s in seeds]
    gains = [g - f for g, f in zip(grpo_all, sft_all)]
    spread = max(grpo_all) - min(grpo_all)
    results["summary"] = {"sft_all": sft_all, "grpo_all": grpo_all, "gains": gains,
                          "mean_gain": statistics.mean(gains), "grpo_spread": spread,
                          "sft_eval_spread": max(sft_all) - min(sft_all),
                          "gain_exceeds_spread": statistics.mean(gains) > spread}
    s = results["summary"]
    print(f"\nall: gains per seed {', '.join(f'{g:+.3f}' for g in gains)}; mean gain {s['mean_gain']:+.3f}; spread of "
          f"GRPO accuracy across seeds {spread:.3f} (of the SFT start's evaluation {s['sft_eval_spread']:.3f}); "
          f"gain exceeds spread: {s['gain_exceeds_spread']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
