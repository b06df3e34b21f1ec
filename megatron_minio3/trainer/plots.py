"""Curves of a run from its metrics.jsonl: `python tools/plot_run.py RUN_DIR [-o OUT.png]`.

A GRPO run gets one figure of nine panels: reward and accuracy (and evaluation Avg@k when the run evaluated),
accuracy per data source, response length, turns and tool calls (errors, exceed and void rates), clip fraction,
KL (ppo_kl, and the KL to the reference when algorithm.kl_coef is set), gradient norm, the trainer-vs-rollout
parity probe (log scale) and the time of each phase. An SFT run gets loss, gradient norm, learning rate and
throughput. Steps without a value (a step with no update has no loss) leave a gap, not a zero.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from megatron_minio3.trainer.logging import read_metrics

# (title, [(metric key or prefix*, label)], y-axis: "linear" | "log" | "unit" (0..1))
GRPO_PANELS = (
    ("reward and accuracy", [("reward/mean", "reward"), ("reward/accuracy", "accuracy"),
                             ("eval/all/avg@*", "eval Avg@k")], "unit"),
    ("accuracy per data source", [("reward/*/accuracy", "{source}")], "unit"),
    ("response length (tokens per trajectory)", [("rollout/generated_tokens_mean", "generated"),
                                                 ("rollout/sequence_length_mean", "sequence")], "linear"),
    ("turns and tool calls (per trajectory)", [("rollout/num_turns_mean", "turns"),
                                               ("rollout/num_tool_calls_mean", "tool calls"),
                                               ("rollout/num_tool_errors_mean", "tool errors"),
                                               ("rollout/exceed_rate", "exceed rate"),
                                               ("rollout/void_rate", "void rate")], "linear"),
    ("clip fraction", [("actor/clip_fraction", "clip fraction")], "linear"),
    ("KL", [("actor/ppo_kl", "ppo_kl (old vs new)"), ("actor/kl", "kl to reference")], "linear"),
    ("gradient norm", [("actor/grad_norm", "mean"), ("actor/grad_norm_max", "max")], "linear"),
    ("parity probe: |logp train - logp rollout|", [("probe/mean_abs_logprob_diff", "mean"),
                                                   ("probe/max_abs_logprob_diff", "max"),
                                                   ("actor/rollout_logprob_diff", "old vs rollout (trained tokens)")],
     "log"),
    ("time per phase (s)", [("timing/*_s", "{phase}")], "linear"),
)
SFT_PANELS = (
    ("SFT loss (NLL per assistant token)", [("sft/loss", "loss")], "linear"),
    ("gradient norm", [("sft/grad_norm", "grad norm")], "linear"),
    ("learning rate", [("sft/lr", "lr")], "linear"),
    ("throughput (tokens/s)", [("sft/tokens_per_s", "tokens/s")], "linear"),
)


def _matching(pattern: str, keys: set[str]) -> list[tuple[str, str]]:
    """(key, the part the * stood for) of every key the pattern matches; a pattern without * matches itself."""
    if "*" not in pattern:
        return [(pattern, "")] if pattern in keys else []
    head, _, tail = pattern.partition("*")
    return sorted((k, k[len(head) : len(k) - len(tail)]) for k in keys
                  if k.startswith(head) and k.endswith(tail) and len(k) > len(head) + len(tail)
                  and "/" not in k[len(head) : len(k) - len(tail)])


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric over the step records; missing or non-finite values are left out."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if value is not None and math.isfinite(value):
            steps.append(record["step"])
            values.append(value)
    return steps, values


def panel_lines(records: list[dict], lines: list[tuple[str, str]]) -> list[tuple[str, list[int], list[float]]]:
    """The (label, steps, values) lines one panel draws."""
    keys = {k for record in records for k in record}
    out = []
    for pattern, label in lines:
        for key, wildcard in _matching(pattern, keys):
            if key == "timing/step_s" and pattern == "timing/*_s":
                label_text = "whole step"
            else:
                label_text = label.format(source=wildcard, phase=wildcard)
            steps, values = series(records, key)
            if values:
                out.append((label_text, steps, values))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves into `out` (default: RUN_DIR/curves.png); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (a run written with 'jsonl' in trainer.loggers)")
    # the steps, and the evaluation before training (trainer.eval_before_train: an "eval" event at step 0)
    records = [r for r in read_metrics(path) if "event" not in r or r["event"] == "eval"]
    if not records:
        raise ValueError(f"{path}: no step was logged yet")
    panels = SFT_PANELS if any(k.startswith("sft/") for k in records[0]) else GRPO_PANELS
    columns = 3 if len(panels) > 4 else 2
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for axis, (title, lines, scale) in zip(axes.flat, panels):
        drawn = panel_lines(records, lines)
        for label, steps, values in drawn:
            axis.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, label=label)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        if scale == "log" and any(v > 0 for _, _, values in drawn for v in values):
            axis.set_yscale("log")
        elif scale == "unit":
            axis.set_ylim(-0.02, 1.02)
        if drawn:
            axis.legend(fontsize=7, loc="best")
        else:
            axis.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=axis.transAxes,
                      color="grey")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle(f"{run_dir} (steps {records[0]['step']}..{records[-1]['step']})", fontsize=11)
    figure.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=90)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="the run's trainer.output_dir (holds metrics.jsonl)")
    parser.add_argument("-o", "--out", type=Path, help="the PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        out = plot_run(args.run_dir, args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"curves: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
