"""Avg@k evaluation of a Qwen2.5-VL checkpoint with the crop tool, per data_source.

    python -m megatron_minio3.trainer.eval --config configs/tiny_cpu.yaml model=PATH \
        data.val_files=[bench.json] data.image_dir=IMAGES eval.k=32

Each question gets k rollouts (temperature eval.temperature; greedy when k == 1) with the evaluation limits
(eval.max_turns, eval.max_images); every sample is scored by the reward stage in validation mode (a sample
whose verifier fails scores 0 and is counted). Avg@k of a data_source is the mean over its questions of the
mean accuracy of their k samples. Questions whose image cannot be loaded are skipped, warned about and
counted (`num_skipped`), and are not part of Avg@k. Writes eval.output_dir/metrics.json and, unless
eval.save_trajectories is false, trajectories.jsonl with every crop (raw and model-side) as images.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from megatron_minio3.config.schema import Config
from megatron_minio3.progress import Progress
from megatron_minio3.rollout.trajectory import Trajectory

logger = logging.getLogger(__name__)


def to_reward_input(traj: Trajectory):
    """The reward stage's view of a finished trajectory."""
    from megatron_minio3.rewards.types import RewardInput

    return RewardInput(
        uid=traj.uid,
        data_source=traj.data_source,
        question=traj.question,
        ground_truth=traj.ground_truth,
        turns=list(traj.turn_texts),
        num_tool_calls=traj.num_tool_calls,
        num_tool_errors=traj.num_tool_errors,
        verifier=traj.verifier,
    )


def avg_at_k(
    uids: Sequence[str], data_sources: Sequence[str], accuracies: Sequence[float]
) -> dict[str, dict[str, float]]:
    """Per data_source (and "all"): avg (mean over questions of their samples' mean accuracy), pass (share of
    questions with at least one correct sample), num_questions, num_samples."""
    if not len(uids) == len(data_sources) == len(accuracies):
        raise ValueError("avg_at_k: uids, data_sources and accuracies must have the same length")
    per_question: dict[tuple[str, str], list[float]] = defaultdict(list)
    for uid, source, accuracy in zip(uids, data_sources, accuracies):
        per_question[(source, uid)].append(accuracy)
    by_source: dict[str, list[list[float]]] = defaultdict(list)
    for (source, _), samples in per_question.items():
        by_source[source].append(samples)
        by_source["all"].append(samples)
    table = {}
    for source, questions in sorted(by_source.items()):
        table[source] = {
            "avg": sum(sum(q) / len(q) for q in questions) / len(questions),
            "pass": sum(max(q) >= 0.5 for q in questions) / len(questions),
            "num_questions": float(len(questions)),
            "num_samples": float(sum(len(q) for q in questions)),
        }
    return table


_SUMMARY_KEYS = ("num_turns", "num_tool_calls", "num_tool_errors", "exceed", "void", "truncated", "num_generated_tokens")


def _summary(traj: Trajectory) -> dict[str, float]:
    """What the statistics need of a trajectory (kept instead of the trajectory itself)."""
    return {key: float(getattr(traj, key)) for key in _SUMMARY_KEYS}


def _trajectory_stats(sources: Sequence[str], summaries: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per data_source (and "all"): the mean of every summary field over its samples."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for source, summary in zip(sources, summaries):
        groups[source].append(summary)
        groups["all"].append(summary)
    return {
        source: {f"{key}_mean": sum(item[key] for item in items) / len(items) for key in _SUMMARY_KEYS}
        for source, items in groups.items()
    }


def _check(cfg: Config) -> None:
    if not cfg.model:
        raise ValueError("model: set it to the HF checkpoint directory to evaluate (model=PATH)")
    if not Path(cfg.model, "config.json").is_file():
        raise ValueError(f"model: {cfg.model} is not an HF checkpoint directory (no config.json)")
    if not cfg.data.val_files:
        raise ValueError("data.val_files: list the Mini-o3 JSON files to evaluate (data.val_files=[a.json,b.json])")


def evaluate(cfg: Config, engines: Sequence[Any] | None = None, *, step: int = 0, total_steps: int = 1,
             prompts: Sequence[Any] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns what is written to metrics.json. `engines` (VllmEngine instances) are
    built from cfg.rollout / cfg.model when not given, and shut down at the end only in that case. `step` (0-based)
    of `total_steps` drives step schedules of the verifiers (reward.iou dynamic thresholds) during training;
    a standalone evaluation scores as at step 0. `prompts`: the questions of data.val_files as the pre-launch
    checks read them (trainer/prelaunch.py); read here when not given."""
    from megatron_minio3.data.minio3_json import read_datasets
    from megatron_minio3.rewards.manager import RewardManager, reward_metrics_by_source
    from megatron_minio3.rollout.agent_loop import AgentLoop
    from megatron_minio3.rollout.seeds import eval_prompt_seeds
    from megatron_minio3.rollout.trajectory import write_trajectories

    if prompts is None:
        _check(cfg)
        prompts = read_datasets(cfg.data.val_files, cfg.data.image_dir, cfg.eval.max_prompts)
    prompts = list(prompts)
    reward = RewardManager(cfg.reward)  # before the engines: a reward config mistake fails fast
    owned = engines is None
    if owned and cfg.rollout.enable_sleep_mode:
        raise ValueError("rollout.enable_sleep_mode is for engines colocated with training; set it to false to evaluate")
    if engines is None:
        from megatron_minio3.rollout.engine import VllmEngine

        engines = [VllmEngine(cfg.rollout, cfg.model, max_images=cfg.eval.max_images) for _ in range(cfg.rollout.num_engines)]
    out_dir = Path(cfg.eval.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        loop = AgentLoop.from_config(engines, engines[0].tokenizer, engines[0].vision, cfg.rollout, cfg.data, cfg.eval)
        started = time.perf_counter()
        uids, sources, accuracies, generations = [], [], [], []
        all_inputs, all_results, summaries, skipped = [], [], [], []
        num_generated = 0
        batch_size = cfg.eval.num_prompts_per_batch
        progress = Progress(len(prompts), "evaluation", unit="question")
        for first in range(0, len(prompts), batch_size):
            chunk = prompts[first : first + batch_size]
            seeds = eval_prompt_seeds(cfg.rollout.seed, step, first, [p.uid for p in chunk])
            batch = asyncio.run(loop.run(chunk, cfg.eval.k, seeds=seeds))
            inputs = [to_reward_input(traj) for traj in batch.trajectories]
            results = reward.score_sync(inputs, validation=True, step=step, total_steps=total_steps)
            for traj, result in zip(batch.trajectories, results):
                uids.append(traj.uid)
                sources.append(traj.data_source)
                accuracies.append(0.0 if result.failed else result.metrics.get("accuracy", 0.0))
                if cfg.trainer.log_val_generations:
                    generations.append({"uid": traj.uid, "sample_index": traj.sample_index,
                                        "data_source": traj.data_source, "question": traj.question,
                                        "ground_truth": traj.ground_truth, "response": "\n\n".join(traj.turn_texts),
                                        "score": result.score})
            all_inputs += inputs
            all_results += results
            skipped += batch.skipped
            num_generated += sum(traj.num_generated_tokens for traj in batch.trajectories)
            summaries += [_summary(traj) for traj in batch.trajectories]
            if cfg.eval.save_trajectories and batch.trajectories:
                extras = [
                    {"score": result.score, "accuracy": accuracy, "reward_failed": result.failed, "reward_error": result.error}
                    for result, accuracy in zip(results, accuracies[-len(results):])
                ]
                write_trajectories(batch.trajectories, out_dir, extras=extras, append=first > 0)
            progress.update(len(chunk))
        progress.close()
        wall_s = time.perf_counter() - started
    finally:
        if owned:
            for engine in engines:
                engine.shutdown()

    table = avg_at_k(uids, sources, accuracies)
    stats = _trajectory_stats(sources, summaries)
    skipped_by_source: dict[str, int] = defaultdict(int)
    source_of = {prompt.uid: prompt.data_source for prompt in prompts}
    for item in skipped:
        skipped_by_source[source_of[item.uid]] += 1
        skipped_by_source["all"] += 1
    k = cfg.eval.k
    per_source = {}
    for source in sorted(set(table) | set(skipped_by_source)):
        row = {f"avg@{k}": math.nan, f"pass@{k}": math.nan, "num_questions": 0.0, "num_samples": 0.0}
        if source in table:
            row = {
                f"avg@{k}": table[source]["avg"],
                f"pass@{k}": table[source]["pass"],
                "num_questions": table[source]["num_questions"],
                "num_samples": table[source]["num_samples"],
            }
        row["num_skipped"] = float(skipped_by_source.get(source, 0))
        row["num_reward_failed"] = float(
            sum(r.failed for i, r in zip(all_inputs, all_results) if source == "all" or i.data_source == source)
        )
        row.update(stats.get(source, {}))
        per_source[source] = row
    metrics = {
        "model": cfg.model,
        "k": k,
        "greedy": k == 1,
        "val_files": list(cfg.data.val_files),
        "per_source": per_source,
        "reward": reward_metrics_by_source(all_inputs, all_results) if all_inputs else {},
        "skipped": [{"uid": s.uid, "reason": s.reason, "detail": s.detail} for s in skipped],
        "wall_s": wall_s,
        "generated_tokens_per_s": num_generated / wall_s if wall_s > 0 else 0.0,
    }
    if generations:  # trainer.log_val_generations: the same uids every evaluation (a draw seeded by trainer.seed)
        chosen = sorted(random.Random(cfg.trainer.seed).sample(range(len(generations)),
                                                                min(cfg.trainer.log_val_generations, len(generations))))
        metrics["generations"] = [generations[i] for i in chosen]
    (out_dir / "metrics.json").write_text(json.dumps(_json_safe(metrics), indent=2) + "\n")
    return metrics


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    from megatron_minio3.config.loader import ConfigError, parse_cli
    from megatron_minio3.trainer.prelaunch import prelaunch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv)
        resources = prelaunch(cfg, "eval")  # model, tokenizer and templates, the questions, the verifiers
        metrics = evaluate(cfg, prompts=resources.val_prompts)  # the questions are not read a second time
    except (ConfigError, ValueError) as exc:  # user mistakes: config, data files, checkpoint path
        print(f"error: {exc}", file=sys.stderr)
        return 2
    k = cfg.eval.k
    for source, row in metrics["per_source"].items():
        avg = row[f"avg@{k}"]
        shown = "n/a" if avg is None or (isinstance(avg, float) and math.isnan(avg)) else f"{100 * avg:.1f}"
        print(f"{source:32s} avg@{k} {shown:>6s}  questions {int(row['num_questions'])}  skipped {int(row['num_skipped'])}")
    print(f"metrics: {Path(cfg.eval.output_dir) / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
