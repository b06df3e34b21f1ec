"""The demo's report (trainer/report.py): the table per stage and difficulty from evaluation outputs, the curves."""
from __future__ import annotations

import json

from megatron_minio3.trainer.report import main


def eval_dir(root, name, accuracy, fmt):
    directory = root / name
    directory.mkdir()
    per_source = {s: {"avg@4": a, "num_tool_calls_mean": 1.0} for s, a in accuracy.items()}
    reward = {"reward/format": fmt["all"], **{f"reward/{s}/format": v for s, v in fmt.items() if s != "all"}}
    (directory / "metrics.json").write_text(json.dumps({"k": 4, "per_source": per_source, "reward": reward}))
    return directory


def test_report_table_and_curves(tmp_path, capsys):
    before = eval_dir(tmp_path, "before", {"all": 0.0, "easy": 0.0}, {"all": 0.1, "easy": 0.1})
    after = eval_dir(tmp_path, "after", {"all": 0.25, "easy": 0.5}, {"all": 0.95, "easy": 1.0})
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"step": i, "sft/loss": 3.0 / i}) + "\n" for i in range(1, 5)))
    grpo = tmp_path / "grpo.jsonl"
    grpo.write_text("".join(json.dumps({"step": i, "reward/accuracy": 0.1 * i, "reward/format": 0.9}) + "\n"
                            for i in range(1, 4)) + json.dumps({"step": 3, "event": "probe"}) + "\n")
    out = tmp_path / "report"
    assert main(["--stage", f"before SFT={before}", "--stage", f"after SFT={after}", "--sft-metrics", str(sft),
                 "--grpo-metrics", str(grpo), "--out", str(out)]) == 0
    table = (out / "report.md").read_text().splitlines()
    assert table[0].startswith("| data source | before SFT: accuracy | before SFT: format-valid")
    assert table[2] == "| easy | 0.000 | 0.100 | 1.000 | 0.500 | 1.000 | 1.000 |"
    assert table[3] == "| all | 0.000 | 0.100 | 1.000 | 0.250 | 0.950 | 1.000 |"  # "all" last
    assert (out / "curves.png").stat().st_size > 10_000 and "curves:" in capsys.readouterr().out
