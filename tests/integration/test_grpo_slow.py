"""Heavier GRPO runs on CPU (`make test-slow`): the separate rollout placement with a TP2 actor and a resume at
another layout, Ctrl-C in the middle of a run, and whether reward rises over more steps. Every run must leave no
process behind. (Killed workers, a judge down and a full disk: test_grpo_faults.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_minio3.data.synthetic import VisualSearchSpec, write_visual_search_dataset
from megatron_minio3.trainer.checkpoint import CheckpointManager
from megatron_minio3.trainer.logging import read_metrics
from tests.distributed import REPO_ROOT
from tests.integration.test_grpo_cpu import dataset, overrides  # noqa: F401 (dataset is a fixture)
from tests.processes import kill_marked, new_marker, wait_until_gone

pytestmark = pytest.mark.slow


def start_grpo(args: list[str], log: Path) -> subprocess.Popen:
    """The command line, its processes marked (`process.marker`) to check that none outlives it."""
    handle = log.open("w")
    marker = new_marker()
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "megatron_minio3.trainer.grpo", "--config", "configs/tiny_cpu.yaml", *args],
        cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, text=True, env={**os.environ, **marker},
    )
    process.marker = marker
    return process


def assert_nothing_left(process: subprocess.Popen) -> None:
    try:
        left = wait_until_gone(process.marker, timeout=30)
        assert left == {}, left
    finally:
        kill_marked(process.marker)


def run_grpo(args: list[str], log: Path, timeout: float = 900) -> str:
    process = start_grpo(args, log)
    assert process.wait(timeout=timeout) == 0, log.read_text()[-6000:]
    assert_nothing_left(process)
    return log.read_text()


def wait_for(path: Path, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, log.read_text()[-6000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.5)


@pytest.mark.parametrize("layout", [{"parallel.tp": 2}, {"parallel.dp": 2, "trainer.num_rollout_workers": 2}])
def test_separate_placement_then_resume_hybrid_single_rank(tiny_hf_dir, dataset, tmp_path, layout):  # noqa: F811
    """Two actor ranks (TP2, or DP2 with two rollout workers sharing the prompts) broadcast their weights to the
    rollout workers over a gloo weight group; the checkpoint is resumed by a single-rank hybrid run, whose
    engine then holds the same weights."""
    out = tmp_path / "run"
    separate = {"trainer.total_steps": 1, "trainer.rollout_placement": "separate", **layout}
    run_grpo(overrides(tiny_hf_dir, dataset, out, **separate), tmp_path / "first.log")
    records = read_metrics(out / "metrics.jsonl")
    baseline, after_1 = [r for r in records if r.get("probe/mean_abs_logprob_diff") is not None]
    assert after_1["actor/num_updates"] >= 1 and after_1["weights/sync_s"] > 0
    assert after_1["probe/mean_abs_logprob_diff"] < 1e-4
    moved = abs(after_1["probe/rollout_logprob_mean"] - baseline["probe/rollout_logprob_mean"])
    assert moved > 100 * after_1["probe/mean_abs_logprob_diff"]

    text = run_grpo(overrides(tiny_hf_dir, dataset, out, **{"trainer.total_steps": 2}), tmp_path / "second.log")
    assert "resumed from" in text and "(step 1," in text
    records = read_metrics(out / "metrics.jsonl")
    resumed_probe = [r for r in records if r.get("event") == "probe"][-1]
    assert resumed_probe["step"] == 1
    assert resumed_probe["probe/rollout_logprob_mean"] == pytest.approx(after_1["probe/rollout_logprob_mean"], abs=1e-5)
    assert resumed_probe["probe/mean_abs_logprob_diff"] < 1e-4
    assert [r["step"] for r in records if "event" not in r] == [1, 2]


def test_ctrl_c_keeps_the_last_complete_checkpoint(tiny_hf_dir, dataset, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    process = start_grpo(overrides(tiny_hf_dir, dataset, out, **{"trainer.total_steps": 50}), log)
    wait_for(out / "checkpoints" / "step_00000001", process, log)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 130, log.read_text()[-6000:]
    assert_nothing_left(process)
    manager = CheckpointManager(out / "checkpoints")
    latest = manager.latest()
    assert latest is not None and f"interrupted; latest complete checkpoint: {latest}" in log.read_text()
    state = manager.read_state(latest)
    assert state["step"] >= 1 and (latest / "model" / "metadata.json").is_file() and (latest / "config.yaml").is_file()
    # A new run resumes from it (unfinished temporary directories, if any, are removed first).
    total = state["step"] + 1
    text = run_grpo(overrides(tiny_hf_dir, dataset, out, **{"trainer.total_steps": total}), tmp_path / "resume.log")
    assert f"resumed from {latest} (step {state['step']}," in text
    assert manager.latest().name == f"step_{total:08d}"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_reward_rises_when_the_signal_is_learnable(tiny_hf_dir, tmp_path):
    """The whole loop optimises its reward: every question's ground truth is option A (whatever the image
    shows), which a random-weight model can learn from the reward alone. Within 12 steps the accuracy goes
    from chance (about 0.25 under the regex) to nearly 1."""
    path = write_visual_search_dataset(
        tmp_path / "data", 16, seed=4, spec=VisualSearchSpec(width=448, height=336, num_distractors=12, question_kinds=("mc",))
    )
    rows = json.loads(path.read_text())
    for row in rows:
        row["solution"] = "A"
    path.write_text(json.dumps(rows))
    out = tmp_path / "run"
    settings = {"trainer.total_steps": 12, "trainer.train_batch_size": 4, "actor.ppo_mini_batch_size": 2,
                "trainer.save_every": 0, "rollout.max_turns": 3, "weights.probe_every": 4,
                "trainer.eval_every": 6, "data.val_files": f"[{path}]", "eval.k": 2, "eval.max_prompts": 4,
                "eval.max_turns": 3, "trainer.log_val_generations": 3, "trainer.eval_before_train": True}
    run_grpo(overrides(tiny_hf_dir, path, out, **settings), tmp_path / "run.log")
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "event" not in r]
    rewards = [r["reward/mean"] for r in steps]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > 0.8 and last > first + 0.3, rewards
    # evaluation during training (Avg@2 on 4 questions) after steps 6 and 12, written per step
    evals = [(r["step"], r["eval/synthetic_visual_search_medium/avg@2"]) for r in steps if "eval/all/avg@2" in r]
    assert [step for step, _ in evals] == [6, 12] and evals[-1][1] > 0.6, evals
    assert (out / "eval" / "step_00000012" / "metrics.json").is_file()
    # the same 3 sampled validation generations logged at each evaluation (trainer.log_val_generations)
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in generations] == [0, 0, 0, 6, 6, 6, 12, 12, 12]
    assert [g["uid"] for g in generations[:3]] == [g["uid"] for g in generations[3:6]] == [g["uid"] for g in generations[6:]]
    # trainer.eval_before_train: the starting model evaluated at step 0, as an event beside the step series
    (before,) = [r for r in read_metrics(out / "metrics.jsonl") if r.get("event") == "eval"]
    assert before["step"] == 0 and before["eval/all/avg@2"] < evals[-1][1]
    assert (out / "eval" / "step_00000000" / "metrics.json").is_file()
    assert all(g["response"] and g["ground_truth"] == "A" for g in generations)
