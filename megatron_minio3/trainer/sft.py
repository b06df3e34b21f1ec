"""Cold-start SFT on the Megatron model: the controller. The work happens in SftWorker ranks (workers/sft_worker.py).

    python -m megatron_minio3.trainer.sft --config configs/qwen2_5_vl_7b_sft.yaml model=HF_DIR sft.train_files=[...]

Each rank reads the conversations (sharegpt JSON/JSONL or parquet, data/sharegpt.py) and renders them in the
rollout's token layout with the loss on the assistant tokens only (trainer/sft_data.py). The controller sees
lengths only: it walks shuffled epochs (seeded by trainer.seed; the position is checkpointed), takes
sft.batch_size conversations per optimizer step, balances them over the data-parallel ranks by workload and
hands each rank its share; the loss is the mean NLL over the step's loss tokens, so it does not depend on the
split. Checkpoints are the GRPO trainer's (atomic, resumable, loadable at any layout; `actor.load=<step>/model`
starts GRPO from one) and with sft.export_hf the final model is written as an HF checkpoint to
<trainer.output_dir>/hf, which `model=` of a GRPO or evaluation run takes as it is.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_minio3.config import Config, parse_cli
from megatron_minio3.trainer.checkpoint import CheckpointError, CheckpointManager
from megatron_minio3.trainer.logging import PhaseTimer

logger = logging.getLogger(__name__)


@dataclass
class SftRunPlan:
    checkpoints: CheckpointManager
    resume_from: Path | None


def prepare_sft(cfg: Config) -> SftRunPlan:
    """Checks that need no worker: ValueError naming the key at fault."""
    from megatron_minio3.packing import padded_length, padding_multiple
    from megatron_minio3.trainer.prelaunch import prelaunch

    prelaunch(cfg, "sft")  # model, tokenizer and templates, the files, loggers
    if cfg.sft.batch_size < cfg.parallel.dp:
        raise ValueError(f"sft.batch_size ({cfg.sft.batch_size}) must be at least parallel.dp ({cfg.parallel.dp}): "
                         "every data-parallel rank needs a conversation per step")
    longest = padded_length(cfg.sft.max_length, padding_multiple(cfg.parallel.tp, cfg.parallel.cp))
    if cfg.actor.packing.max_tokens_per_microbatch < longest:
        raise ValueError(f"actor.packing.max_tokens_per_microbatch ({cfg.actor.packing.max_tokens_per_microbatch}) "
                         f"must hold the longest conversation: sft.max_length = {cfg.sft.max_length} ({longest} padded)")
    checkpoints = CheckpointManager(Path(cfg.trainer.output_dir) / "checkpoints", cfg.trainer.keep_last_checkpoints)
    return SftRunPlan(checkpoints, checkpoints.select(cfg.trainer.resume))  # every file checked against its checksum


def format_sft_step(step: int, total_steps: int, metrics: dict[str, float]) -> str:
    return (f"sft step {step}/{total_steps} | epoch {metrics.get('sft/epoch', 0):.2f} | loss {metrics['sft/loss']:.4f} "
            f"| grad_norm {metrics['sft/grad_norm']:.3f} lr {metrics['sft/lr']:.2e} | {metrics['sft/num_tokens']:.0f} "
            f"loss tokens, {metrics['sft/tokens_per_s']:.0f} tok/s | {metrics['timing/step_s']:.1f} s")


class SFTTrainer:
    def __init__(self, cfg: Config, plan: SftRunPlan):
        import ray

        from megatron_minio3.parallel.cpu_compat import cuda_available
        from megatron_minio3.trainer.logging import MetricsLogger
        from megatron_minio3.trainer.sampler import PromptSampler
        from megatron_minio3.workers.group import WorkerGroup
        from megatron_minio3.workers.placement import _get, check_cluster_resources, node_bundles, worker_env
        from megatron_minio3.workers.sft_worker import SftWorker

        self.cfg, self.plan = cfg, plan
        self.run_dir = Path(cfg.trainer.output_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._owns_ray = not ray.is_initialized()
        self._reaper = None
        self.group = None
        try:
            if self._owns_ray:
                from megatron_minio3.trainer.grpo import _start_ray

                self._reaper = _start_ray(cfg)  # ends whatever the run starts, however the driver exits
            removed = plan.checkpoints.remove_incomplete()
            if removed:
                logger.warning("removed unfinished checkpoint(s): %s", ", ".join(p.name for p in removed))
            if plan.resume_from is not None:
                step = plan.checkpoints.read_state(plan.resume_from)["step"]
                for path in plan.checkpoints.set_aside_after(step):
                    logger.warning("resuming from step %d: the later checkpoint is set aside as %s", step, path)
            on_gpu = cuda_available()
            check_cluster_resources(cfg, on_gpu)  # Ray would wait forever for CPUs/GPUs the cluster does not have
            self.group = WorkerGroup(SftWorker, cfg.parallel.world_size, num_cpus_per_worker=1,
                                     num_gpus_per_worker=1 if on_gpu else 0, env=worker_env(cfg), worker_args=(cfg,),
                                     bundles=node_bundles(cfg) if on_gpu else None)
            self._get = _get
            try:  # the data stays in the workers; rank 0 reports the lengths
                reports = self._call("setup_sft")
            except ray.exceptions.RayTaskError as err:  # bad data (a row, an image): the worker's one-line message
                if isinstance(err.cause, ValueError):
                    raise ValueError(str(err.cause)) from None
                raise
            samples = reports[0]["samples"]
            if not samples:
                raise ValueError(f"sft.train_files: no usable conversation ({reports[0]['left_out']})")
            self.lengths = [length for length, _ in samples]
            self.loss_tokens = [tokens for _, tokens in samples]
            self.left_out = reports[0]["left_out"]
            self.total_steps = cfg.sft.num_epochs * math.ceil(len(samples) / cfg.sft.batch_size)
            self._call("set_total_optimizer_steps", self.total_steps)  # the lr schedule spans the whole run
            self.sampler = PromptSampler(list(range(len(samples))), cfg.trainer.seed)
            self.step = 0
            wandb_run_id = None
            if plan.resume_from is not None:
                wandb_run_id = self._restore(plan.resume_from)
            self.logger = MetricsLogger(cfg, self.run_dir, resume_step=self.step, total_steps=self.total_steps,
                                        formatter=format_sft_step, wandb_run_id=wandb_run_id)
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, *args) -> list:
        return self._get([getattr(w, method).remote(*args) for w in self.group.workers], f"sft.{method}")

    def fit(self) -> None:
        from megatron_minio3.packing import balance_data_parallel

        cfg = self.cfg
        print(f"SFT: {len(self.lengths)} conversations ({self.left_out} left out), {self.total_steps} optimizer steps "
              f"of {cfg.sft.batch_size} over {cfg.sft.num_epochs} epoch(s)", flush=True)
        for step in range(self.step + 1, self.total_steps + 1):
            timer = PhaseTimer()
            with timer("step"):
                batch = self.sampler.next(cfg.sft.batch_size)
                shares = balance_data_parallel([self.lengths[i] for i in batch], cfg.actor.packing, dp_size=cfg.parallel.dp,
                                               tp_size=cfg.parallel.tp, cp_size=cfg.parallel.cp)
                per_dp = [[batch[i] for i in share] for share in shares]
                num_tokens = sum(self.loss_tokens[i] for i in batch)
                started = time.perf_counter()
                report = next(r for r in self._call("sft_step", per_dp, num_tokens) if r)
                seconds = time.perf_counter() - started
                self.step = step
                if cfg.trainer.save_every and (step % cfg.trainer.save_every == 0 or step == self.total_steps):
                    with timer("save"):
                        self.save()
            state = self.sampler.state
            metrics = {f"sft/{k}": v for k, v in report.items()}
            metrics.update({"sft/epoch": state.epoch + state.offset / len(self.lengths),
                            "sft/tokens_per_s": sum(self.lengths[i] for i in batch) / seconds, **timer.metrics()})
            self.logger.log(step, metrics)
        if cfg.sft.export_hf:
            out = self.run_dir / "hf"
            self._call("export_hf", str(out))
            print(f"exported the model as an HF checkpoint: {out}", flush=True)

    def save(self) -> Path:
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "wandb_run_id": self.logger.wandb_run_id,
                 "layout": {n: getattr(self.cfg.parallel, n) for n in ("tp", "pp", "cp", "dp")}}
        path = self.plan.checkpoints.save(self.step, state, self.cfg,
                                          lambda directory: self._call("save_checkpoint", directory))
        print(f"saved checkpoint {path}", flush=True)
        return path

    def _restore(self, path: Path) -> str | None:
        """Load the checkpoint; returns the wandb run id it recorded (None before there was one)."""
        state = self.plan.checkpoints.read_state(path)
        fingerprints = self._call("load_checkpoint", str(path))
        layout = {n: getattr(self.cfg.parallel, n) for n in ("tp", "pp", "cp", "dp")}
        if state["layout"] == layout and fingerprints != state["actor_fingerprint"]:
            raise CheckpointError(f"{path}: the actor state after loading differs from the one saved")
        self.sampler.load_state_dict(state["sampler"])
        self.step = state["step"]
        print(f"resumed from {path} (step {self.step})", flush=True)
        return state.get("wandb_run_id")

    def close(self) -> None:
        import ray

        try:
            if hasattr(self, "logger"):
                self.logger.close()
            if self.group is not None:
                try:
                    self.group.shutdown()
                except ray.exceptions.RayError:
                    for worker in self.group.workers:
                        ray.kill(worker)
                self.group = None
            if self._owns_ray:
                ray.shutdown()
        finally:
            if self._reaper is not None:
                self._reaper.close()
                self._reaper = None


def main(argv: list[str] | None = None) -> int:
    from megatron_minio3.workers.placement import WorkerCrashed

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_cli(sys.argv[1:] if argv is None else argv)
        plan = prepare_sft(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer = None
    try:
        trainer = SFTTrainer(cfg, plan)
        if trainer.step >= trainer.total_steps:
            print(f"{plan.resume_from} is at step {trainer.step} of {trainer.total_steps}: nothing to do")
            return 0
        trainer.fit()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; latest complete checkpoint: {plan.checkpoints.latest() or 'none'}", file=sys.stderr)
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
