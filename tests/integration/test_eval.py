"""Avg@k evaluation: the aggregation rules, and the real command line on vLLM CPU with the tiny checkpoint."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_minio3.data.synthetic import VisualSearchSpec, write_visual_search_dataset
from megatron_minio3.rollout.trajectory import read_trajectories, validate_trajectory
from megatron_minio3.trainer.eval import avg_at_k

REPO = Path(__file__).resolve().parents[2]
ANSWER_OR_ZOOM = (
    r"<think>[a-z ]{1,6}</think>("
    r'<grounding>\{"bbox_2d": \[0\.[0-4], 0\.[0-4], 0\.[5-9], 0\.[5-9]\], "source": "original_image"\}</grounding>'
    r"|<answer>\([A-D]\)</answer>)"
)


def test_avg_at_k_is_a_mean_over_questions_of_sample_means():
    uids = ["q1", "q1", "q1", "q1", "q2", "q2", "q2", "q2", "r1", "r1", "r1", "r1"]
    sources = ["a"] * 8 + ["b"] * 4
    accuracies = [1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    table = avg_at_k(uids, sources, accuracies)
    assert table["a"] == {"avg": (0.25 + 1.0) / 2, "pass": 1.0, "num_questions": 2.0, "num_samples": 8.0}
    assert table["b"] == {"avg": 0.0, "pass": 0.0, "num_questions": 1.0, "num_samples": 4.0}
    assert table["all"]["avg"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    # the same uid in two data sources is two questions
    assert avg_at_k(["x", "x"], ["a", "b"], [1, 0])["all"]["num_questions"] == 2.0
    with pytest.raises(ValueError, match="same length"):
        avg_at_k(["x"], [], [1])


@pytest.fixture(scope="module")
def eval_run(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    spec = VisualSearchSpec(width=448, height=336, num_distractors=8)
    first = write_visual_search_dataset(root, 3, seed=11, spec=spec, name="bench_a")
    second = write_visual_search_dataset(root, 2, seed=12, spec=spec, name="bench_b")
    rows = json.loads(second.read_text())
    for row in rows:
        row["data_source"] = "bench_b"
    rows.append({**rows[0], "doc_id": "broken", "images": ["images/does_not_exist.png"]})
    second.write_text(json.dumps(rows))
    config = {
        "defaults": str(REPO / "configs" / "tiny_cpu.yaml"),
        "rollout": {"guided_regex": ANSWER_OR_ZOOM, "kv_cache_memory_mb": 256, "max_tokens_per_turn": 96},
        "reward": {"default_verifier": "mc"},
        "eval": {"k": 2, "max_turns": 3, "num_prompts_per_batch": 4, "output_dir": str(root / "out")},
    }
    config_path = root / "eval.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable, "-m", "megatron_minio3.trainer.eval", "--config", str(config_path),
        f"model={tiny_hf_dir}", f"data.val_files=[{first},{second}]",
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return root / "out", done.stdout


def test_eval_writes_avg_at_k_per_source(eval_run, tiny_hf_dir):
    out, stdout = eval_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["k"] == 2 and not metrics["greedy"] and metrics["model"] == str(tiny_hf_dir)
    per_source = metrics["per_source"]
    assert set(per_source) == {"synthetic_visual_search_medium", "bench_b", "all"}
    assert per_source["synthetic_visual_search_medium"]["num_questions"] == 3
    assert per_source["bench_b"]["num_questions"] == 2 and per_source["bench_b"]["num_skipped"] == 1
    assert per_source["all"]["num_samples"] == 5 * 2
    assert per_source["all"]["num_turns_mean"] >= 1 and per_source["all"]["num_generated_tokens_mean"] > 0
    assert [s["uid"] for s in metrics["skipped"]] == ["bench_b/broken"]
    # Avg@k recomputed from the written trajectories and their scores
    records = list(read_trajectories(out / "trajectories.jsonl"))
    assert len(records) == 10
    by_question: dict[tuple[str, str], list[float]] = {}
    for traj, extra in records:
        validate_trajectory(traj, image_pad_id=_pad_id(tiny_hf_dir))
        assert traj.num_turns <= 3
        assert extra["accuracy"] in (0.0, 1.0) and not extra["reward_failed"]
        answered = traj.turn_texts[-1].split("<answer>")[-1].split("</answer>")[0] if traj.end_reason == "answer" else None
        assert extra["accuracy"] == float(answered == f"({traj.ground_truth})")
        by_question.setdefault((traj.data_source, traj.uid), []).append(extra["accuracy"])
    for source in ("synthetic_visual_search_medium", "bench_b"):
        means = [sum(v) / len(v) for (s, _), v in by_question.items() if s == source]
        assert per_source[source]["avg@2"] == pytest.approx(sum(means) / len(means))
    assert "avg@2" in stdout and "bench_b" in stdout


def test_eval_saves_crops_as_images(eval_run):
    out, _ = eval_run
    records = list(read_trajectories(out / "trajectories.jsonl"))
    crops = [(traj, image) for traj, _ in records for image in traj.images if image.origin == "crop"]
    assert crops, "no zoom in 10 samples"
    lines = [json.loads(line) for line in (out / "trajectories.jsonl").read_text().splitlines()]
    files = [entry[key] for line in lines for entry in line["images"] if entry["origin"] == "crop" for key in ("raw_file", "model_file")]
    assert files and all((out / name).is_file() for name in files)
    for traj, image in crops:
        assert image.raw.size == (image.box[2] - image.box[0], image.box[3] - image.box[1])
        assert math.prod(image.grid_thw) > 0


def _pad_id(model_dir) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids("<|image_pad|>")
