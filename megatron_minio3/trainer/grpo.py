"""GRPO for Qwen2.5-VL with the crop tool: the controller. It only orchestrates; the work happens in the
actor ranks and rollout engines (workers/), the math in algorithms/, the packing in packing/.

    python -m megatron_minio3.trainer.grpo --config configs/demo_cpu.yaml [key=value ...]

One step: prompts -> n rollouts each -> rewards -> dynamic sampling (more rounds until train_batch_size
groups with a learning signal, or trainer.max_generation_rounds) -> advantages, exceed mask, packing ->
old (and reference) log-probs -> one optimizer step per mini-batch -> weight sync into the engines ->
parity probe -> evaluation every trainer.eval_every steps -> log -> checkpoint every trainer.save_every steps. Every user mistake raises ValueError in
`prepare`, before Ray or any worker starts. See docs/trainer.md.
"""
from __future__ import annotations

import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from megatron_minio3.config import Config, parse_cli
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.trainer.batch import SampleGroup
from megatron_minio3.trainer.checkpoint import CheckpointManager
from megatron_minio3.trainer.logging import PhaseTimer
from megatron_minio3.weights.probe import ParityProbe, ProbePrompt

logger = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """What `prepare` checked and found, handed to the trainer."""

    prompts: list[Prompt]
    probe_prompts: list[Prompt]  # the first weights.probe_num_prompts (none when the probe is off)
    parity: ParityProbe | None  # reports the probe (the rollout side runs its own from the same prompts)
    checkpoints: CheckpointManager
    resume_from: Path | None


def prepare(cfg: Config) -> RunPlan:
    """All checks that need no worker: ValueError naming the key at fault."""
    from megatron_minio3.data.images import ImageLoadError
    from megatron_minio3.data.minio3_json import read_datasets
    from megatron_minio3.packing import padded_length, padding_multiple
    from megatron_minio3.rewards.manager import RewardManager

    if not cfg.model or not Path(cfg.model, "config.json").is_file():
        raise ValueError(f"model: {cfg.model!r} is not an HF Qwen2.5-VL checkpoint directory (no config.json)")
    if not cfg.data.train_files:
        raise ValueError("data.train_files: list the Mini-o3 JSON training files (data.train_files=[a.json])")
    prompts = read_datasets(cfg.data.train_files, cfg.data.image_dir)
    if not prompts:
        raise ValueError(f"data.train_files: {cfg.data.train_files} hold no prompt")
    if cfg.rollout.temperature <= 0:
        raise ValueError(f"rollout.temperature must be > 0 for training (sampling), got {cfg.rollout.temperature}")
    if cfg.trainer.rollout_placement == "hybrid":
        if cfg.parallel.world_size != 1:
            raise ValueError(
                f"trainer.rollout_placement=hybrid runs vLLM inside the single actor process, but parallel gives "
                f"{cfg.parallel.world_size} ranks; use trainer.rollout_placement=separate"
            )
        if cfg.rollout.tensor_parallel_size != 1:
            raise ValueError("rollout.tensor_parallel_size must be 1 with trainer.rollout_placement=hybrid")
    longest = padded_length(cfg.rollout.max_total_tokens, padding_multiple(cfg.parallel.tp, cfg.parallel.cp))
    if cfg.actor.packing.max_tokens_per_microbatch < longest:
        raise ValueError(
            f"actor.packing.max_tokens_per_microbatch ({cfg.actor.packing.max_tokens_per_microbatch}) must hold the "
            f"longest trajectory: rollout.max_total_tokens = {cfg.rollout.max_total_tokens} ({longest} with padding)"
        )
    if cfg.weights.bucket_mb > cfg.rollout.weight_bucket_mb:
        raise ValueError(
            f"weights.bucket_mb ({cfg.weights.bucket_mb}) must not exceed rollout.weight_bucket_mb "
            f"({cfg.rollout.weight_bucket_mb}): the engine would split a bucket between reload calls"
        )
    if cfg.actor.ppo_mini_batch_size * cfg.rollout.n < cfg.parallel.dp:
        raise ValueError(
            f"actor.ppo_mini_batch_size * rollout.n = {cfg.actor.ppo_mini_batch_size * cfg.rollout.n} sequences "
            f"cannot feed parallel.dp = {cfg.parallel.dp} ranks"
        )
    if cfg.trainer.eval_every:
        if not cfg.data.val_files:
            raise ValueError("trainer.eval_every is set but data.val_files is empty: list the evaluation files")
        read_datasets(cfg.data.val_files, cfg.data.image_dir, cfg.eval.max_prompts)
    if "wandb" in cfg.trainer.loggers:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("trainer.loggers: 'wandb' needs the wandb package (pip install wandb)") from None
    RewardManager(cfg.reward)  # a verifier that cannot be built (e.g. a judge without its API key) fails here
    checkpoints = CheckpointManager(Path(cfg.trainer.output_dir) / "checkpoints", cfg.trainer.keep_last_checkpoints)
    latest = checkpoints.latest()
    if latest is not None and not cfg.trainer.resume:
        raise ValueError(
            f"trainer.resume is false but {checkpoints.root} holds checkpoints (latest {latest.name}); resume, or "
            "choose another trainer.output_dir (finished checkpoints are never overwritten)"
        )
    probe_prompts = prompts[: cfg.weights.probe_num_prompts if cfg.weights.probe_every else 0]
    try:
        parity = ParityProbe(
            [ProbePrompt.from_prompt(p) for p in probe_prompts], max_tokens=cfg.weights.probe_max_tokens,
            warn_mean_abs_diff=cfg.weights.probe_warn_mean_abs_diff,
        ) if probe_prompts else None
    except ImageLoadError as err:
        raise ValueError(f"weights.probe_num_prompts: the probe uses the first training prompts, and {err}") from None
    return RunPlan(prompts, probe_prompts, parity, checkpoints, latest)


class GRPOTrainer:
    def __init__(self, cfg: Config, plan: RunPlan):
        import ray
        from transformers import AutoConfig

        from megatron_minio3.rewards.manager import RewardManager
        from megatron_minio3.rollout.tokens import load_vision_spec
        from megatron_minio3.trainer.batch import ImageEncoder
        from megatron_minio3.trainer.logging import MetricsLogger
        from megatron_minio3.trainer.sampler import PromptSampler
        from megatron_minio3.workers.placement import start_workers

        self.cfg = cfg
        self.plan = plan
        self.run_dir = Path(cfg.trainer.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.reward = RewardManager(cfg.reward)
        self.sampler = PromptSampler(plan.prompts, cfg.trainer.seed)
        self.images = ImageEncoder(cfg.model)
        self.vision = load_vision_spec(cfg.model)
        self.image_token_id = AutoConfig.from_pretrained(cfg.model).image_token_id
        self.step = 0
        self.num_optimizer_steps = 0
        resumed = plan.checkpoints.read_state(plan.resume_from) if plan.resume_from else None
        start_step = resumed["step"] if resumed else 0
        mini_batches_per_step = -(-cfg.trainer.train_batch_size // cfg.actor.ppo_mini_batch_size)
        total_optimizer_steps = cfg.trainer.total_steps * cfg.actor.ppo_epochs * mini_batches_per_step
        self.parity = plan.parity
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(num_cpus=max(_cpu_count(), cfg.parallel.world_size + cfg.trainer.num_rollout_workers),
                     include_dashboard=False, log_to_driver=True)
        self.workers = None
        try:
            removed = plan.checkpoints.remove_incomplete()
            if removed:
                logger.warning("removed unfinished checkpoint(s): %s", ", ".join(p.name for p in removed))
            print(f"starting {cfg.parallel.world_size} actor rank(s), rollout placement "
                  f"{cfg.trainer.rollout_placement} ...", flush=True)
            self.workers = start_workers(cfg, total_optimizer_steps, plan.probe_prompts, seed_offset=start_step)
            if resumed:
                self._restore(plan.resume_from, resumed)
            elif cfg.actor.load:  # the engines started from the HF checkpoint, the actor from actor.load
                self.workers.sync_weights()
            self.logger = MetricsLogger(cfg, self.run_dir, resume_step=self.step)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ the loop

    def fit(self) -> None:
        cfg = self.cfg.trainer
        if self.parity is not None and self.step < cfg.total_steps:
            baseline = self.probe()
            print(f"parity probe before step {self.step + 1}: mean |logp_train - logp_rollout| = "
                  f"{baseline['probe/mean_abs_logprob_diff']:.2e}", flush=True)
            self.logger.log_event("probe", self.step, baseline)
        for step in range(self.step + 1, cfg.total_steps + 1):
            timer = PhaseTimer()
            with timer("step"):
                groups, metrics = self.collect(step, timer)
                if groups:
                    metrics.update(self.train(groups, timer))
                if self.parity is not None and step % self.cfg.weights.probe_every == 0:
                    with timer("probe"):
                        metrics.update(self.probe())
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.total_steps):
                    with timer("eval"):
                        metrics.update(self.evaluate(step))
                self.step = step
                if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.total_steps):
                    with timer("save"):
                        self.save()
            self.logger.log(step, {**metrics, **timer.metrics(), "actor/optimizer_steps": self.num_optimizer_steps})
        if "jsonl" in cfg.loggers:
            from megatron_minio3.trainer.logging import read_metrics, summary_lines

            path = self.logger.jsonl_path
            print("\n== GRPO run summary ==\n" + "\n".join(summary_lines(read_metrics(path), path,
                                                                          self.plan.checkpoints.latest())), flush=True)

    def collect(self, step: int, timer: PhaseTimer) -> tuple[list[SampleGroup], dict[str, float]]:
        """Generation rounds until train_batch_size groups with a learning signal (dynamic sampling)."""
        from megatron_minio3.rewards.manager import reward_metrics_by_source
        from megatron_minio3.rollout.agent_loop import RolloutBatch
        from megatron_minio3.trainer.batch import group_by_prompt, groups_to_keep
        from megatron_minio3.trainer.eval import to_reward_input

        cfg = self.cfg
        batch_size = cfg.trainer.train_batch_size
        max_rounds = cfg.trainer.max_generation_rounds if cfg.algorithm.dynamic_sampling else 1
        kept: list[SampleGroup] = []
        trajectories, skipped, inputs, results, dropped = [], [], [], [], Counter()
        num_rounds = num_groups = 0
        generate_s = 0.0
        while len(kept) < batch_size and num_rounds < max_rounds:
            num_rounds += 1
            logger.info("step %d: generation round %d: %d prompts x %d samples (%d of %d groups kept so far)",
                        step, num_rounds, batch_size, cfg.rollout.n, len(kept), batch_size)
            with timer("generate"):
                batch = self.workers.generate(self.sampler.next(batch_size), cfg.rollout.n)
            with timer("reward"):
                round_inputs = [to_reward_input(traj) for traj in batch.trajectories]
                round_results = self.reward.score_sync(
                    round_inputs, validation=False, step=step - 1, total_steps=cfg.trainer.total_steps
                )
            drop = self.reward.drop_mask(round_results, validation=False)
            groups = group_by_prompt(batch.trajectories, round_results)
            keep = groups_to_keep(groups, drop, cfg.algorithm)
            offset = 0
            for group, keep_group in zip(groups, keep):
                size = len(group.trajectories)
                if keep_group:
                    kept.append(group)
                else:
                    dropped["reward_failed" if any(drop[offset : offset + size]) else "no_reward_spread"] += 1
                offset += size
            num_groups += len(groups)
            trajectories += batch.trajectories
            skipped += batch.skipped
            inputs += round_inputs
            results += round_results
            generate_s += batch.wall_s
        if len(kept) < batch_size:
            logger.warning("step %d: %d of %d groups with a learning signal after %d generation round(s); training on "
                           "those", step, len(kept), batch_size, num_rounds)
        metrics = {
            **RolloutBatch(trajectories, skipped, generate_s).metrics(),
            **(reward_metrics_by_source(inputs, results) if inputs else {}),
            "sampling/num_rounds": float(num_rounds),
            "sampling/num_groups": float(num_groups),
            "sampling/num_kept_groups": float(min(len(kept), batch_size)),
            "sampling/num_dropped_groups": float(sum(dropped.values())),
            "sampling/num_dropped_no_reward_spread": float(dropped["no_reward_spread"]),
            "sampling/num_dropped_reward_failed": float(dropped["reward_failed"]),
        }
        return kept[:batch_size], metrics

    def train(self, groups: list[SampleGroup], timer: PhaseTimer) -> dict[str, float]:
        """Pack, old (and reference) log-probs, one optimizer step per mini-batch, weight sync."""
        from megatron_minio3.trainer.batch import pack_mini_batches, training_items

        cfg = self.cfg
        with timer("pack"):
            items = training_items(groups, cfg.algorithm, self.images, self.vision, self.image_token_id)
            self.images.clear()
            mini_batches = pack_mini_batches(
                items, [len(g.trajectories) for g in groups], cfg.actor.ppo_mini_batch_size, cfg.actor.packing,
                cfg.parallel, image_token_id=self.image_token_id, spatial_merge_size=self.vision.merge_size,
            )
            shares = [[(mb.micro_batches[d], mb.loss_counts) for mb in mini_batches] for d in range(cfg.parallel.dp)]
        logger.info("step %d: %d sequences in %d mini-batch(es): old log-probs, then %d epoch(s) of updates",
                    self.step + 1, len(items), len(mini_batches), cfg.actor.ppo_epochs)
        self.workers.call_per_dp_rank("load_batch", shares)
        with timer("old_logprobs"):
            diffs = self.workers.results(self.workers.call("compute_logprobs", "old_logprobs"))
        if cfg.use_reference_model:
            with timer("ref_logprobs"):
                self.workers.call("compute_logprobs", "ref_logprobs")
        updates = []
        with timer("update"):
            for _ in range(cfg.actor.ppo_epochs):
                for index, mini_batch in enumerate(mini_batches):
                    if mini_batch.loss_counts.num_tokens == 0:  # every sequence exceeded: nothing to learn
                        continue
                    updates.append(self.workers.results(self.workers.call("update", index))[0])
        self.workers.call("drop_batch")
        self.num_optimizer_steps += len(updates)
        num_tokens = sum(d["num_tokens"] for d in diffs)
        metrics = {
            "actor/num_updates": float(len(updates)),
            "actor/num_sequences": float(len(items)),
            "actor/num_loss_tokens": float(sum(mb.loss_counts.num_tokens for mb in mini_batches)),
            "actor/rollout_logprob_diff": sum(d["abs_diff_sum"] for d in diffs) / max(num_tokens, 1),
            "actor/rollout_logprob_diff_max": max(d["abs_diff_max"] for d in diffs),
        }
        if updates:
            for name in updates[0]:
                metrics[f"actor/{name}"] = sum(u[name] for u in updates) / len(updates)
            metrics["actor/grad_norm_max"] = max(u["grad_norm"] for u in updates)
            metrics["actor/lr"] = updates[-1]["lr"]
            with timer("sync"):
                metrics.update(self.workers.sync_weights())
        return metrics

    def probe(self) -> dict[str, float]:
        """The engine's greedy probe sequences, scored by the actor (weights/probe.py)."""
        from megatron_minio3.packing import pack_mini_batch
        from megatron_minio3.weights.probe import ParityProbe

        cfg = self.cfg
        sequences = self.workers.probe_rollout()
        items = ParityProbe.packing_items(
            sequences, self.images.processor, image_token_id=self.image_token_id,
            spatial_merge_size=self.vision.merge_size,
        )
        padded = [items[i % len(items)] for i in range(max(len(items), cfg.parallel.dp))]  # >= 1 per dp rank
        packed = pack_mini_batch(padded, cfg.actor.packing, dp_size=cfg.parallel.dp, tp_size=cfg.parallel.tp,
                                 cp_size=cfg.parallel.cp)
        scored = {}
        for share in self.workers.results(self.workers.call_per_dp_rank("score", packed.micro_batches)):
            scored.update(share)
        metrics = self.parity.report(sequences, [scored[i] for i in range(len(items))])  # warns on a mismatch
        rollout_logprobs = [lp for seq in sequences for lp in seq.rollout_logprobs]
        metrics["probe/rollout_logprob_mean"] = sum(rollout_logprobs) / len(rollout_logprobs)  # tracks the weights
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        """Avg@k and pass@k per data_source on data.val_files (eval.*), under <output_dir>/eval/step_N."""
        output_dir = self.run_dir / "eval" / f"step_{step:08d}"
        result = self.workers.evaluate(str(output_dir))
        k = self.cfg.eval.k
        return {
            f"eval/{source}/{name}": row[name]
            for source, row in result["per_source"].items()
            for name in (f"avg@{k}", f"pass@{k}")
        }

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        def write_shards(directory: str) -> list[dict]:
            return self.workers.call("save_checkpoint", directory)

        state = {"step": self.step, "num_optimizer_steps": self.num_optimizer_steps,
                 "sampler": self.sampler.state_dict(), "layout": _layout(self.cfg)}
        path = self.plan.checkpoints.save(self.step, state, self.cfg, write_shards)
        print(f"saved checkpoint {path}", flush=True)
        return path

    def _restore(self, path: Path, state: dict) -> None:
        fingerprints = self.workers.call("load_checkpoint", str(path))
        if state["layout"] == _layout(self.cfg) and fingerprints != state["actor_fingerprint"]:
            raise RuntimeError(f"{path}: the actor state after loading differs from the one saved "
                               f"({fingerprints} != {state['actor_fingerprint']})")
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.num_optimizer_steps = state["num_optimizer_steps"]
        self.workers.sync_weights()  # the engines started from the HF checkpoint
        print(f"resumed from {path} (step {self.step}, prompt position {state['sampler']})", flush=True)

    def close(self) -> None:
        import ray

        if hasattr(self, "logger"):
            self.logger.close()
        if self.workers is not None:
            self.workers.shutdown()
            self.workers = None
        if self._owns_ray:
            ray.shutdown()


def _layout(cfg: Config) -> dict[str, int]:
    return {name: getattr(cfg.parallel, name) for name in ("tp", "pp", "cp", "dp")}


def _cpu_count() -> int:
    return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    from megatron_minio3.workers.placement import WorkerCrashed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv)
        plan = prepare(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if plan.resume_from is not None:
        done = plan.checkpoints.read_state(plan.resume_from)["step"]
        if done >= cfg.trainer.total_steps:
            print(f"{plan.resume_from} is at step {done} of trainer.total_steps={cfg.trainer.total_steps}: nothing "
                  "to do (raise trainer.total_steps to train further, or choose another trainer.output_dir)")
            return 0
    trainer = None
    try:
        trainer = GRPOTrainer(cfg, plan)
        trainer.fit()
    except KeyboardInterrupt:
        latest = plan.checkpoints.latest()
        print(f"\ninterrupted; latest complete checkpoint: {latest or 'none'}", file=sys.stderr)
        return 130
    except WorkerCrashed as err:
        print(f"error: {err}\nlatest complete checkpoint: {plan.checkpoints.latest() or 'none'}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
