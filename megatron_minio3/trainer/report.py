"""The demo's report: accuracy per difficulty before SFT, after SFT and after GRPO, and the training curves.

    python -m megatron_minio3.trainer.report --stage "before SFT=DIR" --stage "after SFT=DIR" ... \
        [--sft-metrics SFT_DIR/metrics.jsonl] [--grpo-metrics GRPO_DIR/metrics.jsonl] --out OUT_DIR

Each stage directory is an evaluation's output (trainer/eval.py: metrics.json). Writes OUT_DIR/report.md (the
table) and OUT_DIR/curves.png (SFT loss; GRPO reward, accuracy and format rate per step), and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

COLUMNS = ("accuracy", "format-valid", "tool calls")


def stage_rows(metrics: dict) -> dict[str, dict[str, float]]:
    """Per data_source (and "all"): Avg@k accuracy, the share of samples with a well-formed final answer (the
    reward's format check: every turn thinks, zooms or answers in the tags) and the tool calls per sample."""
    k = metrics["k"]
    rows = {}
    for source, row in metrics["per_source"].items():
        fmt = metrics["reward"].get(f"reward/{source}/format" if source != "all" else "reward/format", math.nan)
        rows[source] = {"accuracy": row.get(f"avg@{k}", math.nan), "format-valid": fmt,
                        "tool calls": row.get("num_tool_calls_mean", math.nan)}
    return rows


def _cell(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_table(stages: list[tuple[str, dict[str, dict[str, float]]]]) -> str:
    sources = sorted({s for _, rows in stages for s in rows}, key=lambda s: (s == "all", s))
    header = "| data source | " + " | ".join(f"{name}: {col}" for name, _ in stages for col in COLUMNS) + " |"
    lines = [header, "|" + " --- |" * (1 + len(stages) * len(COLUMNS))]
    for source in sources:
        cells = [_cell(rows.get(source, {}).get(col)) for _, rows in stages for col in COLUMNS]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _series(path: Path | None, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` (or of the first key starting with it, when it ends with "@") in metrics.jsonl."""
    if path is None or not path.is_file():
        return [], []
    steps, values = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        name = next((k for k in record if k == key or (key.endswith("@") and k.startswith(key))), None)
        if "event" in record or name is None or record[name] is None:
            continue
        steps.append(record["step"])
        values.append(record[name])
    return steps, values


def plot_curves(sft_metrics: Path | None, grpo_metrics: Path | None, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(*_series(sft_metrics, "sft/loss"), color="tab:blue")
    left.set(title="SFT loss (NLL per assistant token)", xlabel="optimizer step", ylabel="loss")
    for key, label in (("reward/accuracy", "accuracy (all samples)"), ("reward/format", "format-valid"),
                       ("eval/all/avg@", "eval Avg@k")):
        steps, values = _series(grpo_metrics, key)
        if values:
            right.plot(steps, values, marker="o", label=label)
    right.set(title="GRPO, per step", xlabel="step", ylim=(-0.02, 1.02))
    right.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", action="append", default=[], help="NAME=EVAL_DIR (repeat, in order)")
    parser.add_argument("--sft-metrics", type=Path)
    parser.add_argument("--grpo-metrics", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    stages = []
    for item in args.stage:
        name, _, directory = item.partition("=")
        stages.append((name, stage_rows(json.loads((Path(directory) / "metrics.json").read_text()))))
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(stages)
    (args.out / "report.md").write_text(table + "\n")
    print(table)
    print(f"curves: {plot_curves(args.sft_metrics, args.grpo_metrics, args.out / 'curves.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
