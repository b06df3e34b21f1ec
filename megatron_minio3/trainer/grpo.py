"""GRPO for Qwen2.5-VL with the crop tool: the controller. It only orchestrates and decides; the data lives in
the workers (workers/), the math in algorithms/, the packing in packing/.

    python -m megatron_minio3.trainer.grpo --config configs/demo_cpu.yaml [key=value ...]
    python -m megatron_minio3.trainer.grpo --config configs/qwen2_5_vl_7b_grpo.yaml --dry-run [key=value ...]

One step, as calls on the workers: generation rounds (each rollout handle rolls out, scores and groups its
prompts and returns numbers) until train_batch_size groups with a learning signal (dynamic sampling) ->
the controller plans the mini-batches and the data-parallel split from those numbers -> the actor ranks
receive their sequences straight from the rollout handles and run old (and reference) log-probs and one
optimizer step per mini-batch -> weight sync into every engine -> parity probe on every engine ->
evaluation every trainer.eval_every steps -> log -> checkpoint every trainer.save_every steps.
Every user mistake raises ValueError in `prepare`, before Ray or any worker starts (a damaged checkpoint
included); `--dry-run` stops there and prints the launch plan. What Ray can only tell once it runs (the
resources of a cluster joined through RAY_ADDRESS) is checked before the first worker starts. Whatever the
driver starts is stopped when it ends, however it ends (trainer/reaper.py). See docs/trainer.md.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_minio3.config import Config, parse_cli
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.trainer.checkpoint import CheckpointError, CheckpointManager
from megatron_minio3.trainer.logging import PhaseTimer
from megatron_minio3.trainer.step_plan import Collection, collect_rounds
from megatron_minio3.weights.probe import ProbePrompt

logger = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (a full disk, a dead file system); the previous complete one is intact."""


class RewardsUnavailable(RuntimeError):
    """Every sample of a step failed to score (e.g. the judge stayed down beyond its retries): nothing to learn."""


@dataclass
class RunPlan:
    """What `prepare` checked and found, handed to the trainer."""

    prompts: list[Prompt]
    probe_prompts: list[Prompt]  # the first weights.probe_num_prompts (none when the probe is off)
    checkpoints: CheckpointManager
    resume_from: Path | None


def prepare(cfg: Config, *, dry_run: bool = False) -> RunPlan:
    """All checks that need no worker: ValueError naming the key at fault. With CUDA (or `dry_run`) that includes
    the launch plan (trainer/launch_plan.py: GPUs, placement per node, memory per GPU per phase), which
    `dry_run` prints."""
    from megatron_minio3.data.images import ImageLoadError
    from megatron_minio3.packing import padded_length, padding_multiple
    from megatron_minio3.parallel.cpu_compat import cuda_available
    from megatron_minio3.trainer.launch_plan import (
        build_launch_plan,
        check_launch_plan,
        check_layout,
        format_launch_plan,
        load_hf_config_json,
    )

    from megatron_minio3.trainer.prelaunch import prelaunch

    # files, images, tokenizer and templates, loggers, verifiers (a dry run plans from config.json alone)
    prompts = prelaunch(cfg, "grpo", tokenizer=not dry_run).train_prompts
    check_placement(cfg, on_gpus=dry_run or cuda_available())
    hf_config = load_hf_config_json(cfg.model)
    if dry_run or cuda_available():
        launch = build_launch_plan(cfg, hf_config)
        if dry_run:
            print(format_launch_plan(launch), flush=True)
        check_launch_plan(launch)
    else:  # no GPU to plan for: the model's sizes against the layout still (heads, kv heads, layers by TP/PP)
        check_layout(cfg, hf_config)
    longest = padded_length(cfg.rollout.max_total_tokens, padding_multiple(cfg.parallel.tp, cfg.parallel.cp))
    if cfg.actor.packing.max_tokens_per_microbatch < longest:
        raise ValueError(
            f"actor.packing.max_tokens_per_microbatch ({cfg.actor.packing.max_tokens_per_microbatch}) must hold the "
            f"longest trajectory: rollout.max_total_tokens = {cfg.rollout.max_total_tokens} ({longest} with padding)"
        )
    handles = num_rollout_handles(cfg)
    if cfg.trainer.prompts_per_round < handles:
        multiplier = cfg.trainer.prompts_per_round_multiplier
        per_round = f"trainer.train_batch_size={cfg.trainer.train_batch_size}" if multiplier == 1 else (
            f"{cfg.trainer.prompts_per_round} (trainer.train_batch_size={cfg.trainer.train_batch_size} x "
            f"trainer.prompts_per_round_multiplier={multiplier:g})")
        raise ValueError(
            f"{per_round} prompts per generation round cannot feed the run's {handles} rollout handles "
            f"({_handles_origin(cfg)}): some engines would never generate; raise trainer.train_batch_size so that a "
            f"round has at least {handles} prompts"
        )
    checkpoints = CheckpointManager(Path(cfg.trainer.output_dir) / "checkpoints", cfg.trainer.keep_last_checkpoints)
    resume_from = checkpoints.select(cfg.trainer.resume)  # every file checked against its recorded checksum
    probe_prompts = prompts[: cfg.weights.probe_num_prompts if cfg.weights.probe_every else 0]
    try:
        for prompt in probe_prompts:
            ProbePrompt.from_prompt(prompt)  # the rollout handles load these images again
    except ImageLoadError as err:
        raise ValueError(f"weights.probe_num_prompts: the probe uses the first training prompts, and {err}") from None
    return RunPlan(prompts, probe_prompts, checkpoints, resume_from)


def num_rollout_handles(cfg: Config) -> int:
    """Rollout handles the prompts of a round are split over: engines of R ranks (hybrid) or rollout workers."""
    if cfg.trainer.rollout_placement == "hybrid":
        return max(1, cfg.parallel.world_size // cfg.rollout.tensor_parallel_size)
    return cfg.trainer.num_rollout_workers


def _handles_origin(cfg: Config) -> str:
    if cfg.trainer.rollout_placement == "hybrid":
        return (f"hybrid placement: parallel tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x cp {cfg.parallel.cp} x dp "
                f"{cfg.parallel.dp} ranks / rollout.tensor_parallel_size {cfg.rollout.tensor_parallel_size}")
    return f"trainer.num_rollout_workers={cfg.trainer.num_rollout_workers}"


def check_placement(cfg: Config, *, on_gpus: bool) -> None:
    """Where the engines go (workers/placement.py) and the memory keys that only mean something there.
    `on_gpus`: the run is planned for GPUs (this machine has CUDA, or a dry run plans for `cluster`)."""
    ranks, engine_tp = cfg.parallel.world_size, cfg.rollout.tensor_parallel_size
    if cfg.rollout.enable_sleep_mode and not on_gpus:
        raise ValueError("rollout.enable_sleep_mode needs CUDA (vLLM's sleep mode frees GPU memory; the CPU build "
                         "has none): set it to false here")
    if cfg.trainer.rollout_placement == "hybrid":
        if ranks % engine_tp:
            raise ValueError(
                f"rollout.tensor_parallel_size ({engine_tp}) must divide the actor's {ranks} ranks "
                f"(parallel: tp {cfg.parallel.tp} x pp {cfg.parallel.pp} x cp {cfg.parallel.cp} x dp {cfg.parallel.dp}) "
                "with trainer.rollout_placement=hybrid: each engine spans that many actor ranks"
            )
        if engine_tp > 1 and cfg.rollout.num_engines != 1:
            raise ValueError(
                f"rollout.num_engines must be 1 when an engine spans rollout.tensor_parallel_size={engine_tp} ranks"
            )
        return
    for key, value in (("actor.offload_to_host_between_phases", cfg.actor.offload_to_host_between_phases),
                       ("rollout.enable_sleep_mode", cfg.rollout.enable_sleep_mode)):
        if value:
            raise ValueError(f"{key} frees memory for engines that share the actor's devices; with "
                             "trainer.rollout_placement=separate they have their own: set it to false")
    if not on_gpus and engine_tp != 1:
        raise ValueError("rollout.tensor_parallel_size must be 1 with trainer.rollout_placement=separate on a machine "
                         "without CUDA (vLLM CPU engines in their own process)")


class GRPOTrainer:
    def __init__(self, cfg: Config, plan: RunPlan):
        import ray

        from megatron_minio3.trainer.logging import MetricsLogger
        from megatron_minio3.trainer.sampler import PromptSampler
        from megatron_minio3.workers.placement import start_workers

        self.cfg = cfg
        self.plan = plan
        self.run_dir = Path(cfg.trainer.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sampler = PromptSampler(plan.prompts, cfg.trainer.seed)
        self.step = 0
        self.num_optimizer_steps = 0
        resumed = plan.checkpoints.read_state(plan.resume_from) if plan.resume_from else None
        start_step = resumed["step"] if resumed else 0
        mini_batches_per_step = -(-cfg.trainer.train_batch_size // cfg.actor.ppo_mini_batch_size)
        total_optimizer_steps = cfg.trainer.total_steps * cfg.actor.ppo_epochs * mini_batches_per_step
        self._owns_ray = not ray.is_initialized()
        self._reaper = None
        self.workers = None
        try:
            if self._owns_ray:
                self._reaper = _start_ray(cfg)
            removed = plan.checkpoints.remove_incomplete()
            if removed:
                logger.warning("removed unfinished checkpoint(s): %s", ", ".join(p.name for p in removed))
            if resumed:
                for path in plan.checkpoints.set_aside_after(start_step):
                    logger.warning("resuming from step %d: the later checkpoint is set aside as %s", start_step, path)
            print(f"starting {cfg.parallel.world_size} actor rank(s), rollout placement "
                  f"{cfg.trainer.rollout_placement} ...", flush=True)
            self.workers = start_workers(cfg, total_optimizer_steps, plan.probe_prompts)
            print(f"{len(self.workers.rollout)} rollout handle(s) ready", flush=True)
            if resumed:
                self._restore(plan.resume_from, resumed)
            elif cfg.actor.load:  # the engines started from the HF checkpoint, the actor from actor.load
                self.workers.sync_weights()
            self.logger = MetricsLogger(cfg, self.run_dir, resume_step=self.step,
                                        wandb_run_id=resumed.get("wandb_run_id") if resumed else None)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ the loop

    def fit(self) -> None:
        from megatron_minio3.trainer.step_plan import plan_step

        cfg = self.cfg.trainer
        probing = bool(self.plan.probe_prompts)
        if probing and self.step < cfg.total_steps:
            baseline = self.workers.probe()
            print(f"parity probe before step {self.step + 1}: mean |logp_train - logp_rollout| = "
                  f"{baseline['probe/mean_abs_logprob_diff']:.2e} (worst of {baseline['probe/num_engines']:.0f} "
                  "engine(s))", flush=True)
            self.logger.log_event("probe", self.step, baseline)
        if cfg.eval_before_train and self.step == 0:
            timer = PhaseTimer()
            with timer("eval"):
                before = self.evaluate(0)
            print("evaluation before training: " + ", ".join(f"{k[len('eval/'):]} {v:.3f}" for k, v in sorted(before.items())),
                  flush=True)
            self.logger.log_event("eval", 0, {**before, **timer.metrics()}, everywhere=True)
        stage = None
        for step in range(self.step + 1, cfg.total_steps + 1):
            previous, stage = stage, cfg.stage_at(step, self.cfg.rollout.n, self.cfg.rollout.max_tokens_per_turn)
            if cfg.stages and (previous is None or stage.index != previous.index):
                print(f"step {step}: schedule stage {stage.index} of {len(cfg.stages)} (trainer.stages): rollout.n "
                      f"{stage.n}, max_tokens_per_turn {stage.max_tokens_per_turn}", flush=True)
            timer = PhaseTimer()
            with timer("step"):
                collection = self.collect(step, timer)
                metrics = collection.metrics()
                if collection.kept:
                    step_plan = plan_step(collection.kept, self.cfg.actor.ppo_mini_batch_size,
                                          self.cfg.actor.packing, self.cfg.parallel,
                                          seq_mean_denominator=self.cfg.algorithm.seq_mean_denominator)
                    logger.info("step %d: %d sequences in %d mini-batch(es)", step, step_plan.num_sequences,
                                len(step_plan.mini_batches))
                    with timer("train"):
                        metrics.update(self.workers.train(step_plan))
                    self.num_optimizer_steps += int(metrics["actor/num_updates"])
                    with timer("sync"):
                        metrics.update(self.workers.sync_weights())
                if probing and step % self.cfg.weights.probe_every == 0:
                    with timer("probe"):
                        metrics.update(self.workers.probe())
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.total_steps):
                    with timer("eval"):
                        metrics.update(self.evaluate(step))
                self.step = step
                if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.total_steps):
                    with timer("save"):
                        self.save()
            if cfg.stages:
                metrics.update({"schedule/stage": float(stage.index), "schedule/n": float(stage.n),
                                "schedule/max_tokens_per_turn": float(stage.max_tokens_per_turn)})
            self.logger.log(step, {**metrics, **timer.metrics(), "actor/optimizer_steps": self.num_optimizer_steps})
        if "jsonl" in cfg.loggers:
            from megatron_minio3.trainer.logging import read_metrics, summary_lines

            path = self.logger.jsonl_path
            print("\n== GRPO run summary ==\n" + "\n".join(summary_lines(read_metrics(path), path,
                                                                          self.plan.checkpoints.latest())), flush=True)

    def collect(self, step: int, timer: PhaseTimer) -> Collection:
        """Generation rounds until train_batch_size groups with a learning signal are kept (dynamic sampling), at
        most trainer.max_generation_rounds of them."""
        cfg, dynamic = self.cfg.trainer, self.cfg.algorithm.dynamic_sampling

        def generate_round(prompts, round_index, next_prompts):
            with timer("generate"):
                return self.workers.generate_round(prompts, step, round_index, next_prompts)

        collection = collect_rounds(generate_round, self.sampler, cfg.train_batch_size,
                                    cfg.max_generation_rounds if dynamic else 1, cfg.prompts_per_round,
                                    cfg.overlap_rounds, step)
        if cfg.overlap_rounds:  # a round started early and not needed is dropped; followers are released
            self.workers.end_generation()
        check_rewards_available(collection, step)
        if not collection.full:
            logger.warning(collection.shortfall_warning(step, dynamic))
        return collection

    def evaluate(self, step: int) -> dict[str, float]:
        """Avg@k and pass@k per data_source on data.val_files (eval.*), under <output_dir>/eval/step_N (step 0: the
        starting model, trainer.eval_before_train)."""
        output_dir = self.run_dir / "eval" / f"step_{step:08d}"
        result = self.workers.evaluate(str(output_dir), step)
        self.logger.log_generations(step, result.get("generations", []))
        k = self.cfg.eval.k
        return {
            f"eval/{source}/{name}": row[name]
            for source, row in result["per_source"].items()
            for name in (f"avg@{k}", f"pass@{k}")
        }

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        def write_shards(directory: str) -> list[dict]:
            return self.workers.save_checkpoint(directory)

        state = {"step": self.step, "num_optimizer_steps": self.num_optimizer_steps,
                 "sampler": self.sampler.state_dict(), "layout": _layout(self.cfg),
                 "wandb_run_id": self.logger.wandb_run_id}
        try:
            path = self.plan.checkpoints.save(self.step, state, self.cfg, write_shards)
        except Exception as err:  # noqa: BLE001 - what failed is named; the traceback goes to the log
            logger.debug("checkpoint save failed", exc_info=True)
            raise CheckpointSaveError(f"saving the checkpoint of step {self.step} under {self.plan.checkpoints.root} "
                                      f"failed: {_root_cause(err)}{self.plan.checkpoints.space_note()}") from err
        print(f"saved checkpoint {path}", flush=True)
        return path

    def _restore(self, path: Path, state: dict) -> None:
        fingerprints = self.workers.load_checkpoint(str(path))
        if state["layout"] == _layout(self.cfg) and fingerprints != state["actor_fingerprint"]:
            raise CheckpointError(f"{path}: the actor state after loading differs from the one saved "
                                  f"({fingerprints} != {state['actor_fingerprint']})")
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.num_optimizer_steps = state["num_optimizer_steps"]
        self.workers.sync_weights()  # the engines started from the HF checkpoint
        print(f"resumed from {path} (step {self.step}, prompt position {state['sampler']})", flush=True)

    def close(self) -> None:
        import ray

        try:
            if hasattr(self, "logger"):
                self.logger.close()
            if self.workers is not None:
                self.workers.shutdown()
                self.workers = None
            if self._owns_ray:
                ray.shutdown()
        finally:
            if self._reaper is not None:  # whatever the orderly shutdown left (Ray's agents ignore SIGTERM)
                self._reaper.close()
                self._reaper = None


def check_rewards_available(collection: Collection, step: int) -> None:
    """RewardsUnavailable when every sample of the step that gave an answer failed to score (the judge down beyond
    its retries, a reward server gone): nothing the policy answered can be rewarded, and going on would only spend
    steps without updates. Samples without an answer are scored 0 without asking the verifier, so they do not
    count; a step where some answers were scored trains on those."""
    answered = [s for s in collection.samples if not (s.trajectory.void or s.trajectory.exceed)]
    failed = [s.reward for s in answered if s.reward.failed]
    if answered and len(failed) == len(answered):
        raise RewardsUnavailable(
            f"step {step}: all {len(failed)} answered samples of {collection.num_rounds} generation round(s) failed "
            f"to score, first: {failed[0].error}; fix the verifier (e.g. the judge's endpoint), then resume")


def _root_cause(err: BaseException) -> str:
    """The innermost OSError of `err` (through Ray's task errors and exception chains) if there is one, else the
    last line of the innermost error's message."""
    seen, current, found = set(), err, None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            found = current
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    if found is not None:
        return str(found)
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _layout(cfg: Config) -> dict[str, int]:
    return {name: getattr(cfg.parallel, name) for name in ("tp", "pp", "cp", "dp")}


def _cpu_count() -> int:
    return os.cpu_count() or 1


def _start_ray(cfg: Config):
    """Join the cluster named by RAY_ADDRESS (several nodes: `ray start --head` on the first, `ray start
    --address=HEAD:6379` on the others, see docs/trainer.md), or start a local one on this machine, watched by a
    Reaper (returned) that ends every process of it when this driver exits, however it exits. The actors of a
    joined cluster end with their driver (Ray's owner fate sharing)."""
    import ray

    from megatron_minio3.trainer.reaper import Reaper

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        print(f"joined the Ray cluster at {address}: {ray.cluster_resources().get('CPU', 0):g} CPU(s), "
              f"{ray.cluster_resources().get('GPU', 0):g} GPU(s), {len(ray.nodes())} node(s)", flush=True)
        return None
    reaper = Reaper()
    num_cpus = max(_cpu_count(), cfg.parallel.world_size + cfg.trainer.num_rollout_workers)
    try:
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception when its raylet registers late
            if "timed out during startup" not in str(err):
                raise
            logger.warning("Ray's local cluster did not come up in time (a loaded machine?); trying once more")
            ray.shutdown()
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    except BaseException:
        reaper.close()
        raise
    return reaper


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the trainer closes what it started."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    from megatron_minio3.workers.placement import LaunchRefused, WorkerCrashed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in args
    try:
        cfg = parse_cli([arg for arg in args if arg != "--dry-run"])
        plan = prepare(cfg, dry_run=dry_run)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if dry_run:
        print("dry run: every pre-launch check passed; nothing was started", flush=True)
        return 0
    if plan.resume_from is not None:
        done = plan.checkpoints.read_state(plan.resume_from)["step"]
        if done >= cfg.trainer.total_steps:
            print(f"{plan.resume_from} is at step {done} of trainer.total_steps={cfg.trainer.total_steps}: nothing "
                  "to do (raise trainer.total_steps to train further, or choose another trainer.output_dir)")
            return 0
    trainer = None
    previous_sigterm = _on_sigterm(_raise_terminated)
    try:
        trainer = GRPOTrainer(cfg, plan)
        trainer.fit()
    except KeyboardInterrupt as err:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(err, _Terminated) else ("interrupted", 130)
        print(f"\n{what}; latest complete checkpoint: {plan.checkpoints.latest() or 'none'}", file=sys.stderr)
        return code
    except (LaunchRefused, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (WorkerCrashed, CheckpointSaveError, RewardsUnavailable) as err:
        print(f"error: {err}\nlatest complete checkpoint: {plan.checkpoints.latest() or 'none'}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        _on_sigterm(previous_sigterm)
    return 0


def _on_sigterm(handler):
    """Install `handler` for SIGTERM (main thread only: elsewhere signals cannot be handled); the previous one."""
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
