"""tools/plot_run.py: the curves of a GRPO and an SFT run from metrics.jsonl."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from megatron_minio3.trainer.plots import GRPO_PANELS, panel_lines, plot_run

REPO_ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def grpo_records() -> list[dict]:
    records = [{"event": "probe", "step": 0, "probe/mean_abs_logprob_diff": 1e-7}]
    for step in range(1, 6):
        record = {"step": step, "reward/mean": 0.1 * step, "reward/accuracy": 0.1 * step,
                  "reward/easy/accuracy": 0.2 * step, "reward/hard/accuracy": 0.05 * step, "reward/easy/mean": 0.3,
                  "rollout/generated_tokens_mean": 100.0 + step, "rollout/num_turns_mean": 2.0,
                  "rollout/easy/num_turns_mean": 2.5, "actor/clip_fraction": 0.01, "actor/ppo_kl": 1e-4,
                  "actor/grad_norm": 1.0, "probe/mean_abs_logprob_diff": 2e-7, "timing/generate_s": 10.0,
                  "timing/train_s": 3.0, "timing/step_s": 14.0}
        if step == 3:  # a step without an update: no loss-side values, and a NaN the logger wrote as null
            for key in ("actor/clip_fraction", "actor/ppo_kl", "actor/grad_norm"):
                del record[key]
            record["actor/loss"] = None
        if step == 5:
            record["eval/all/avg@4"] = 0.4
        records.append(record)
    return records


def test_grpo_panels_draw_the_logged_series_and_leave_gaps(tmp_path):
    records = [r for r in grpo_records() if "event" not in r]
    by_title = {title: panel_lines(records, lines) for title, lines, _ in GRPO_PANELS}
    assert [label for label, _, _ in by_title["accuracy per data source"]] == ["easy", "hard"]  # not reward/accuracy
    reward = by_title["reward and accuracy"]
    assert [label for label, _, _ in reward] == ["reward", "accuracy", "eval Avg@k"] and reward[2][1] == [5]
    assert by_title["clip fraction"][0][1] == [1, 2, 4, 5]  # step 3 had no update: a gap
    phases = {label: steps for label, steps, _ in by_title["time per phase (s)"]}
    assert set(phases) == {"generate", "train", "whole step"}
    assert [label for label, _, _ in by_title["KL"]] == ["ppo_kl (old vs new)"]  # no reference model in this run


def test_plot_run_writes_a_png_for_grpo_and_sft_runs_from_the_command_line(tmp_path):
    grpo, sft = tmp_path / "grpo", tmp_path / "sft"
    grpo.mkdir()
    sft.mkdir()
    _write(grpo / "metrics.jsonl", grpo_records())
    _write(sft / "metrics.jsonl", [{"step": s, "sft/loss": 2.0 / s, "sft/grad_norm": 1.0, "sft/lr": 1e-3,
                                     "sft/tokens_per_s": 900.0} for s in range(1, 9)])
    for run in (grpo, sft):
        result = subprocess.run([sys.executable, "tools/plot_run.py", str(run)], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"curves: {run / 'curves.png'}"
        with Image.open(run / "curves.png") as image:
            width, height = image.size
            colours = len(image.convert("RGB").resize((200, 150)).getcolors(maxcolors=40000))
        assert width > 600 and height > 300 and colours > 20  # drawn, not blank
    assert plot_run(sft, tmp_path / "other" / "sft.png").is_file()
    result = subprocess.run([sys.executable, "tools/plot_run.py", str(tmp_path / "nothing")], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no metrics.jsonl" in result.stderr
