"""Training metrics: a console line per step, `metrics.jsonl` in the run directory, TensorBoard event files
(<run dir>/tensorboard) and Weights & Biases (online or offline; a resumed run continues the same wandb run: its id is
kept in the checkpoint), as trainer.loggers says. Sampled validation generations go to every sink that shows text
(`log_generations`).

Metric names (all floats; one record per step):
    reward/...              every generated sample of the step (rewards.reward_metrics_by_source):
                            reward/mean, reward/accuracy, reward/<data_source>/mean, .../accuracy, .../num_failed
    rollout/...             turns, tool calls and errors, exceed/void/truncated rates, generated tokens, throughput;
                            per data source as rollout/<data_source>/... (rollout.agent_loop.rollout_metrics_by_source);
                            rollout/tail_s: the last trajectory's finish minus the median one, summed over rounds;
                            rollout/early_s: how long rounds ran before the driver asked for them (overlap_rounds)
    rollout/engine/...      why generation took what it took (rollout.engine.EngineStats): busy_share (the engines'
                            time stepping, adding and rendering requests over their wall time), prefix_cache_hit_rate
                            and _later_turns (prompt tokens found in vLLM's prefix cache), encoder_cache_hit_rate
                            (1 - images run through the vision tower / images sent), images_encoded, steps
    sampling/...            dynamic sampling: generation rounds, groups generated / kept / dropped (and why)
    actor/...               loss, pg_loss, clip_fraction, ppo_kl, entropy (kl) as token-means over the step's
                            mini-batches, grad_norm (mean and max), lr, optimizer steps; rollout_logprob_diff:
                            mean |old log-prob (actor) - rollout log-prob (engine)| on the trained tokens
    weights/...             weight sync: seconds, GB, GB/s, buckets
    probe/...               rollout-vs-trainer parity probe after the sync (weights/probe.py)
    eval/<source>/avg@k     evaluation on data.val_files every trainer.eval_every steps (trainer/eval.py), pass@k
    timing/<phase>_s        wall seconds of each phase of the step; timing/step_s the whole step
"""
from __future__ import annotations

import json
import math
import secrets
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megatron_minio3.config import Config, to_dict


class PhaseTimer:
    """`with timer("rollout"): ...` adds the block's wall time to timing/rollout_s."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - started

    def metrics(self) -> dict[str, float]:
        return {f"timing/{phase}_s": seconds for phase, seconds in self.seconds.items()}


def _json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


class MetricsLogger:
    """Writes each step's metrics to the configured sinks (trainer.loggers)."""

    def __init__(self, cfg: Config, run_dir: Path, *, resume_step: int, print_fn=print, total_steps: int | None = None,
                 formatter=None, wandb_run_id: str | None = None):
        """total_steps / formatter: the console line's step count and format (GRPO's by default). wandb_run_id: the
        id saved in the checkpoint the run resumes from (a new run gets a new one: `self.wandb_run_id`)."""
        self.sinks = set(cfg.trainer.loggers)
        self.total_steps = cfg.trainer.total_steps if total_steps is None else total_steps
        self.format = formatter or format_step
        self.print = print_fn
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        if self.jsonl_path.exists():  # drop records of steps after the checkpoint the run continues from
            kept = [r for r in read_metrics(self.jsonl_path) if r["step"] <= resume_step]
            tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            tmp.replace(self.jsonl_path)
        self._tensorboard = None
        if "tensorboard" in self.sinks:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of steps after the checkpoint (written before a crash) are dropped by readers
            self._tensorboard = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)
        self._wandb = None
        self.wandb_run_id = wandb_run_id
        if "wandb" in self.sinks:
            import wandb

            self.wandb_run_id = wandb_run_id or secrets.token_hex(4)  # wandb ids: lowercase letters and digits
            self._wandb = wandb.init(
                project=cfg.trainer.project, name=cfg.trainer.experiment, dir=str(self.run_dir), config=to_dict(cfg),
                id=self.wandb_run_id, resume="allow", mode=cfg.trainer.wandb_mode,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if "jsonl" in self.sinks:
            record = {"step": step, "time": time.time(), **{k: _json_value(v) for k, v in sorted(metrics.items())}}
            with self.jsonl_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if "console" in self.sinks:
            self.print(self.format(step, self.total_steps, metrics))
        self._to_dashboards(step, metrics)

    def log_event(self, event: str, step: int, metrics: dict[str, float], *, everywhere: bool = False) -> None:
        """A record outside the step series (e.g. the parity probe before the first step): jsonl only, or with
        everywhere=True (the evaluation before training, at step 0) also TensorBoard and wandb."""
        if everywhere:
            self._to_dashboards(step, metrics)
        if "jsonl" in self.sinks:
            record = {"event": event, "step": step, "time": time.time(),
                      **{k: _json_value(v) for k, v in sorted(metrics.items())}}
            with self.jsonl_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def _to_dashboards(self, step: int, metrics: dict[str, float]) -> None:
        """TensorBoard scalars (non-finite values left out) and wandb, when configured."""
        if self._tensorboard is not None:
            for key, value in sorted(metrics.items()):
                if math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_generations(self, step: int, samples: list[dict]) -> None:
        """Sampled validation generations (trainer.log_val_generations; keys of GENERATION_COLUMNS): appended to
        <run dir>/generations.jsonl, a markdown table under the text tag `val/generations` in TensorBoard and a
        table `val/generations` in wandb."""
        if not samples:
            return
        rows = [[sample.get(column) for column in GENERATION_COLUMNS] for sample in samples]
        if "jsonl" in self.sinks:
            with (self.run_dir / "generations.jsonl").open("a", encoding="utf-8") as handle:
                for sample in samples:
                    handle.write(json.dumps({"step": step, **sample}) + "\n")
        if self._tensorboard is not None:
            self._tensorboard.add_text("val/generations", generations_markdown(rows), global_step=step)
            self._tensorboard.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({"val/generations": wandb.Table(columns=list(GENERATION_COLUMNS), data=rows)}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


GENERATION_COLUMNS = ("uid", "sample_index", "data_source", "question", "ground_truth", "response", "score")


def generations_markdown(rows: list[list]) -> str:
    """A markdown table (TensorBoard renders it) of generation rows; cells escaped for the table."""
    def cell(value) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(GENERATION_COLUMNS) + " |", "|" + " --- |" * len(GENERATION_COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class _Missing:
    def __format__(self, spec: str) -> str:
        return "-"


class _Values(dict):
    """Metric values for str.format_map: "{reward/mean:.3f}"; absent or non-finite values print as "-"."""

    def __init__(self, values: dict):
        super().__init__({k: v for k, v in values.items() if not isinstance(v, float) or math.isfinite(v)})

    def __missing__(self, key: str) -> _Missing:
        return _Missing()


STEP_TEMPLATE = (
    "step {step}/{total_steps} | reward {reward/mean:.3f} ({per_source}) acc {reward/accuracy:.3f} | kept "
    "{sampling/num_kept_groups:.0f}/{sampling/num_groups:.0f} groups in {sampling/num_rounds:.0f} round(s) | "
    "{timing/step_s:.1f} s\n"
    "  rollout: turns {rollout/num_turns_mean:.2f} tool calls {rollout/num_tool_calls_mean:.2f} (errors "
    "{rollout/num_tool_errors_mean:.2f}) exceed {rollout/exceed_rate:.2f} void {rollout/void_rate:.2f} | response "
    "{rollout/generated_tokens_mean:.0f} tok, sequence {rollout/sequence_length_mean:.0f} tok | "
    "{rollout/generated_tokens_per_s:.0f} tok/s | engine busy {rollout/engine/busy_share:.2f}, later-turn prefix "
    "hits {rollout/engine/prefix_cache_hit_rate_later_turns:.2f}, tail {rollout/tail_s:.1f} s\n"
)
TRAIN_TEMPLATE = (
    "  train: loss {actor/loss:.4f} pg {actor/pg_loss:.4f} clip {actor/clip_fraction:.3f} ppo_kl {actor/ppo_kl:.2e} "
    "entropy {actor/entropy:.3f} grad_norm {actor/grad_norm:.3f} lr {actor/lr:.2e} | {actor/num_updates:.0f} "
    "update(s) | |old - rollout| logp {actor/rollout_logprob_diff:.2e} | sync {weights/sync_s:.2f} s probe |diff| "
    "{probe/mean_abs_logprob_diff:.2e}\n"
)


def _sources(keys) -> list[str]:
    return sorted({k.split("/")[1] for k in keys if k.startswith("reward/") and k.count("/") == 2})


def format_step(step: int, total_steps: int, metrics: dict[str, float]) -> str:
    """Four lines: rewards and sampling, rollout shape, training and sync, time per phase."""
    values = _Values(metrics)
    per_source = ", ".join(f"{s} {values[f'reward/{s}/mean']:.3f}" for s in _sources(metrics))
    text = STEP_TEMPLATE.format_map(_Values({**values, "step": step, "total_steps": total_steps,
                                             "per_source": per_source}))
    if "actor/num_updates" in metrics:
        text += TRAIN_TEMPLATE.format_map(values)
    else:
        text += "  train: no group with a learning signal this step: no update, weights unchanged\n"
    evals = sorted((k[len("eval/") :], v) for k, v in values.items() if k.startswith("eval/"))
    if evals:
        text += "  eval: " + ", ".join(f"{name} {value:.3f}" for name, value in evals) + "\n"
    phases = sorted((k[len("timing/") : -len("_s")], v) for k, v in metrics.items()
                    if k.startswith("timing/") and k != "timing/step_s")
    return text + "  time: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in phases)


def _mean(records: list[dict], key: str) -> float | _Missing:
    values = [r[key] for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else _Missing()


def _sum(records: list[dict], key: str) -> float:
    return sum(r.get(key) or 0.0 for r in records)


def summary_lines(records: list[dict], metrics_path: Path, checkpoint: Path | None) -> list[str]:
    """What a run did, from its metrics.jsonl records (steps and probe events)."""
    steps = [r for r in records if "event" not in r]
    if not steps:
        return ["no training step was run"]
    first, last = _Values(steps[0]), _Values(steps[-1])
    trained = [r for r in steps if r.get("actor/num_updates")]
    lines = [
        f"steps {first['step']}..{last['step']}: {len(trained)} with updates, "
        f"{_sum(steps, 'actor/num_updates'):.0f} optimizer steps, {_sum(steps, 'rollout/num_trajectories'):.0f} "
        "trajectories",
        "reward per step:   " + " ".join(f"{_Values(r)['reward/mean']:.3f}" for r in steps),
        "accuracy per step: " + " ".join(f"{_Values(r)['reward/accuracy']:.3f}" for r in steps),
    ]
    for source in _sources({k for r in steps for k in r}):
        key = f"reward/{source}/mean"
        lines.append(f"  {source}: reward {first[key]:.3f} (step {first['step']}) -> {last[key]:.3f} "
                     f"(step {last['step']}), mean {_mean(steps, key):.3f}")
    lines += [
        f"rollout (mean per trajectory): turns {_mean(steps, 'rollout/num_turns_mean'):.2f}, tool calls "
        f"{_mean(steps, 'rollout/num_tool_calls_mean'):.2f} "
        f"(errors {_mean(steps, 'rollout/num_tool_errors_mean'):.2f}), "
        f"exceed {_mean(steps, 'rollout/exceed_rate'):.2f}, "
        f"void {_mean(steps, 'rollout/void_rate'):.2f}, response "
        f"{_mean(steps, 'rollout/generated_tokens_mean'):.0f} tokens",
        f"dynamic sampling: {_sum(steps, 'sampling/num_kept_groups'):.0f} of {_sum(steps, 'sampling/num_groups'):.0f} "
        f"groups kept ({_sum(steps, 'sampling/num_dropped_no_reward_spread'):.0f} without reward spread, "
        f"{_sum(steps, 'sampling/num_dropped_reward_failed'):.0f} with a reward failure)",
        f"training (mean over steps): loss {_mean(trained, 'actor/loss'):.4f}, clip fraction "
        f"{_mean(trained, 'actor/clip_fraction'):.3f}, ppo_kl {_mean(trained, 'actor/ppo_kl'):.2e}, grad norm "
        f"{_mean(trained, 'actor/grad_norm'):.3f}, entropy {_mean(trained, 'actor/entropy'):.3f}",
        f"weight sync: {_mean(trained, 'weights/sync_s'):.2f} s per sync, {_mean(trained, 'weights/sync_gb'):.3f} GB",
    ]
    evaluated = [r for r in records if "event" not in r or r["event"] == "eval"]  # eval_before_train: step 0
    for key in sorted({k for r in evaluated for k in r if k.startswith("eval/")}):
        lines.append(f"{key}: " + " ".join(f"{r[key]:.3f} (step {r['step']})" for r in evaluated
                                            if r.get(key) is not None))
    probes = [r for r in records if r.get("probe/mean_abs_logprob_diff") is not None]
    if probes:
        lines.append(
            "trainer-vs-rollout parity probe (greedy, unconstrained): mean |logp_train - logp_rollout| <= "
            f"{max(r['probe/mean_abs_logprob_diff'] for r in probes):.2e} over {len(probes)} probe(s); max |diff| "
            f"{max(r['probe/max_abs_logprob_diff'] for r in probes):.2e}"
        )
    lines += [
        f"old log-prob (actor) vs rollout log-prob (engine) on trained tokens: mean |diff| "
        f"{_mean(trained, 'actor/rollout_logprob_diff'):.2e} (large under rollout.guided_regex: the engine reports "
        "the constrained distribution, the actor the model's own)",
        f"time per step: {_mean(steps, 'timing/step_s'):.1f} s (generate {_mean(steps, 'timing/generate_s'):.1f}, "
        f"old log-probs {_mean(trained, 'timing/old_logprobs_s'):.1f}, update {_mean(trained, 'timing/update_s'):.1f}, "
        f"sync {_mean(trained, 'timing/sync_s'):.2f})",
        f"metrics: {metrics_path}",
        f"checkpoint: {checkpoint if checkpoint else 'none (trainer.save_every=0)'}",
    ]
    return lines


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file, in order."""
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
