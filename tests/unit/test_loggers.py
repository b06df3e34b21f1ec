"""The metric sinks (trainer/logging.py) read back by their own readers, the per-source rollout statistics and the
progress lines (megatron_minio3/progress.py)."""
from __future__ import annotations

import io
import json

import pytest

from megatron_minio3.config import Config
from megatron_minio3.progress import Progress
from megatron_minio3.rollout.agent_loop import rollout_metrics_by_source
from megatron_minio3.rollout.trajectory import TrajectorySummary
from megatron_minio3.trainer.logging import MetricsLogger, generations_markdown


def _accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_events_are_read_by_tensorboard_and_a_resume_replaces_the_steps_after_its_checkpoint(tmp_path):
    cfg = Config()
    cfg.trainer.loggers = ["tensorboard"]
    logger = MetricsLogger(cfg, tmp_path, resume_step=0)
    for step in (1, 2, 3):
        logger.log(step, {"reward/mean": 0.1 * step, "reward/src/mean": 0.2 * step, "actor/loss": float("nan")})
    logger.close()
    # the run resumes from its step-2 checkpoint: step 3 is logged again with another value
    logger = MetricsLogger(cfg, tmp_path, resume_step=2)
    logger.log(3, {"reward/mean": 0.9, "reward/src/mean": 0.8})
    logger.log(4, {"reward/mean": 1.0, "reward/src/mean": 1.0})
    logger.close()
    logger = MetricsLogger(cfg, tmp_path, resume_step=4)
    logger.log_event("probe", 4, {"probe/mean_abs_logprob_diff": 1e-7})  # jsonl only (none configured here)
    logger.log_event("eval", 4, {"eval/all/avg@4": 0.5}, everywhere=True)  # also TensorBoard
    logger.close()
    accumulator = _accumulator(tmp_path / "tensorboard")
    assert set(accumulator.Tags()["scalars"]) == {"reward/mean", "reward/src/mean", "eval/all/avg@4"}  # no NaN loss
    series = [(e.step, round(e.value, 6)) for e in accumulator.Scalars("reward/mean")]
    assert series == [(1, 0.1), (2, 0.2), (3, 0.9), (4, 1.0)]
    assert [(e.step, e.value) for e in accumulator.Scalars("eval/all/avg@4")] == [(4, 0.5)]
    assert not (tmp_path / "metrics.jsonl").exists()  # only the configured sinks


def test_validation_generations_go_to_tensorboard_text_and_generations_jsonl(tmp_path):
    cfg = Config()
    cfg.trainer.loggers = ["jsonl", "tensorboard"]
    logger = MetricsLogger(cfg, tmp_path, resume_step=0)
    samples = [{"uid": "q1", "sample_index": 0, "data_source": "s", "question": "<image>\nWhich | colour?",
                "ground_truth": "A", "response": "<think>x</think>\n<answer>A</answer>", "score": 1.0}]
    logger.log_generations(5, samples)
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert lines == [{"step": 5, **samples[0]}]
    accumulator = _accumulator(tmp_path / "tensorboard")
    assert accumulator.Tags()["tensors"] == ["val/generations/text_summary"]
    (event,) = accumulator.Tensors("val/generations/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 5 and "Which \\| colour?" in text and "<br>" in text and "| 1.000 |" in text
    assert generations_markdown([]).count("\n") == 1  # header and rule only


def test_wandb_offline_resume_continues_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = Config()
    cfg.trainer.loggers = ["wandb"]
    cfg.trainer.wandb_mode = "offline"
    first = MetricsLogger(cfg, tmp_path, resume_step=0)
    run_id = first.wandb_run_id
    first.log(1, {"reward/mean": 0.5})
    first.close()
    second = MetricsLogger(cfg, tmp_path, resume_step=1, wandb_run_id=run_id)  # the id the checkpoint kept
    assert second.wandb_run_id == run_id
    second.log(2, {"reward/mean": 0.6})
    second.close()
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs
    assert all(list((tmp_path / "wandb" / name).glob(f"run-{run_id}.wandb")) for name in runs)


def test_unknown_logger_and_generations_without_evaluation_are_refused():
    cfg = Config()
    cfg.trainer.loggers = ["console", "tensorbord"]
    with pytest.raises(ValueError, match="unknown logger.*tensorbord.*tensorboard"):
        cfg.trainer.validate()
    cfg.trainer.loggers = ["console"]
    cfg.trainer.log_val_generations = 4
    with pytest.raises(ValueError, match="log_val_generations.*eval_every"):
        cfg.trainer.validate()
    cfg.trainer.eval_before_train = True  # an evaluation to sample from
    cfg.trainer.validate()


def _summary(source: str, turns: int, calls: int, errors: int, exceed: bool, void: bool, tokens: int):
    return TrajectorySummary(data_source=source, num_turns=turns, num_tool_calls=calls, num_tool_errors=errors,
                             exceed=exceed, void=void, truncated=False, num_generated_tokens=tokens,
                             sequence_length=tokens + 100, attention_length=tokens + 100)


def test_rollout_metrics_per_data_source():
    metrics = rollout_metrics_by_source([
        _summary("a", 3, 2, 1, False, False, 100), _summary("b", 1, 0, 0, False, True, 10),
        _summary("a", 5, 4, 0, True, False, 300),
    ])
    assert metrics["rollout/a/num_trajectories"] == 2 and metrics["rollout/b/num_trajectories"] == 1
    assert metrics["rollout/a/num_turns_mean"] == 4 and metrics["rollout/a/num_tool_calls_mean"] == 3
    assert metrics["rollout/a/num_tool_errors_mean"] == 0.5 and metrics["rollout/a/exceed_rate"] == 0.5
    assert metrics["rollout/b/void_rate"] == 1 and metrics["rollout/a/void_rate"] == 0
    assert metrics["rollout/a/generated_tokens_mean"] == 200 and metrics["rollout/b/generated_tokens_mean"] == 10
    assert rollout_metrics_by_source([]) == {}


def test_progress_prints_plain_periodic_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.delenv("MINIO3_PROGRESS", raising=False)
    stream = io.StringIO()  # not a terminal
    with Progress(4, "evaluation", unit="question", interval_s=0.0, stream=stream) as progress:
        for _ in range(4):
            progress.update()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("evaluation: 1/4 question(s) (25%), ") and "s left" in lines[0]
    assert len(lines) == 4 and lines[-1].startswith("evaluation: 4/4 question(s) in ")  # 3 while running, 1 at the end
    quiet = io.StringIO()
    with Progress(100, "quick", interval_s=60.0, stream=quiet) as progress:
        progress.update(100)
    assert quiet.getvalue() == ""  # work done within the interval prints nothing
    scaled = io.StringIO()
    with Progress(3_000_000, "writing", unit="B", scale=1e6, scale_unit="MB", interval_s=0.0, stream=scaled) as progress:
        progress.update(1_500_000)
    assert scaled.getvalue().splitlines()[0].startswith("writing: 1.5/3.0 MB(s) (50%)")


def test_progress_draws_a_bar_on_a_terminal_and_can_be_silenced(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("MINIO3_PROGRESS", raising=False)
    terminal = Terminal()
    with Progress(10, "convert", unit="tensor", stream=terminal) as progress:
        progress.update(10)
    assert "convert: 100%" in terminal.getvalue() and "10/10" in terminal.getvalue()
    monkeypatch.setenv("MINIO3_PROGRESS", "off")
    silent = Terminal()
    with Progress(10, "convert", interval_s=0.0, stream=silent) as progress:
        progress.update(10)
    assert silent.getvalue() == ""
