"""Ray actor of one Megatron rank: the policy (MegatronActor), the reference policy, weight export, checkpoints.

The controller (trainer/grpo.py) calls every method on all ranks at once through a WorkerGroup; each rank
holds its data-parallel share of the step's packed mini-batches between `load_batch` and `drop_batch`.

With `trainer.rollout_placement: hybrid` the rank process also holds the rollout engines (a RolloutRuntime):
rollout and training take turns in one process and a weight sync loads the exported buckets straight into
the engines. With `separate`, rank 0 broadcasts the buckets to the RolloutWorkers over a weight group.

A checkpoint holds two Megatron distributed checkpoints (torch_dist, loadable at any TP/PP): `model/`, the
model with the conversion metadata, exactly what tools/convert_hf_to_megatron.py writes (so `actor.load`
and tools/convert_megatron_to_hf.py take it as it is), and `optimizer/`, the optimizer's sharded state and
the lr scheduler's state (absent before the first optimizer step).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_minio3.algorithms.policy_loss import LossCounts
from megatron_minio3.config.schema import Config
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.packing.thd import PackedMicroBatch
from megatron_minio3.workers.group import RankWorker

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "lr_scheduler"


class ActorWorker(RankWorker):
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, env: dict[str, str],
                 cfg: Config):
        super().__init__(rank, world_size, master_addr, master_port, env)
        self.cfg = cfg
        self.rollout = None  # RolloutRuntime in hybrid placement
        self.weight_group = None  # separate placement, rank 0 only
        self._mini_batches: list[tuple[list[PackedMicroBatch], LossCounts]] = []

    # ------------------------------------------------------------------ set-up

    def setup(self, total_optimizer_steps: int, probe_prompts: Sequence[Prompt], seed_offset: int) -> dict:
        """Build the policy (and reference) from the HF checkpoint, the exporter and, in hybrid placement,
        the engines. Returns this rank's coordinates."""
        from megatron_minio3.convert.megatron_checkpoint import load_megatron_checkpoint
        from megatron_minio3.convert.qwen2_5_vl import detect_naming
        from megatron_minio3.convert.safetensors_io import SafetensorsReader
        from megatron_minio3.weights.export import WeightExporter, resolve_export_dtype
        from megatron_minio3.workers.actor.actor import MegatronActor, ReferencePolicy

        cfg = self.cfg
        coords = self.init_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp, seed=cfg.trainer.seed)
        temperature = cfg.rollout.temperature
        self.actor = MegatronActor.from_hf(
            cfg.model, cfg.actor, cfg.algorithm, total_optimizer_steps=total_optimizer_steps, temperature=temperature
        )
        if cfg.actor.load:
            load_megatron_checkpoint(self.actor.module, cfg.actor.load)
        self.ref = None
        if cfg.use_reference_model:
            self.ref = ReferencePolicy.from_hf(
                cfg.model, cfg.actor.dtype, temperature=temperature, offload_to_host=cfg.ref.offload_to_host
            )
            if cfg.actor.load:
                load_megatron_checkpoint(self.ref.model, cfg.actor.load)
        with SafetensorsReader(cfg.model) as reader:
            self.naming = detect_naming(reader.names(), where=cfg.model)
            self.hf_dtypes = {name: str(reader.dtype(name)).removeprefix("torch.") for name in reader.names()}
        self.exporter = WeightExporter(
            self.actor.module,
            self.naming,
            bucket_bytes=cfg.weights.bucket_mb << 20,
            dtype=resolve_export_dtype(cfg.weights.dtype, cfg.rollout.dtype, cfg.model),
        )
        if cfg.trainer.rollout_placement == "hybrid":
            from megatron_minio3.workers.rollout_worker import RolloutRuntime

            self.rollout = RolloutRuntime(cfg, probe_prompts, seed_offset)
        return {**coords, "is_last_stage": self.ctx.is_last_stage, "writes_results": self._writes_results}

    @property
    def _writes_results(self) -> bool:
        """One rank per data-parallel share reports results: the last pipeline stage's first TP/CP rank."""
        return self.ctx.is_last_stage and self.ctx.tp_rank == 0 and self.ctx.cp_rank == 0

    # ------------------------------------------------------------------ rollout (hybrid placement)

    def generate(self, prompts: Sequence[Prompt], num_samples: int):
        return self.rollout.generate(prompts, num_samples)

    def probe_rollout(self):
        return self.rollout.probe_rollout()

    def evaluate(self, output_dir: str) -> dict:
        return self.rollout.evaluate(output_dir)

    # ------------------------------------------------------------------ training

    def load_batch(self, mini_batches: list[tuple[list[PackedMicroBatch], LossCounts]]) -> None:
        """This rank's data-parallel share of every mini-batch of the step: (micro-batches, LossCounts)."""
        self._mini_batches = mini_batches

    def drop_batch(self) -> None:
        self._mini_batches = []

    def compute_logprobs(self, name: str) -> dict[str, float]:
        """Store per-token log-probs of the loaded batch as token value `name`: "old_logprobs" from the
        policy, "ref_logprobs" from the reference. For old log-probs, also returns sums comparing them with
        the rollout engine's log-probs of the same tokens (reporting ranks only; {} elsewhere)."""
        model = {"old_logprobs": self.actor, "ref_logprobs": self.ref}[name]
        sums = {"abs_diff_sum": 0.0, "abs_diff_max": 0.0, "num_tokens": 0.0}
        for micro_batches, _ in self._mini_batches:
            scores = model.compute_logprobs(micro_batches)
            if scores is None:  # not the last pipeline stage: the loss is computed elsewhere
                continue
            for mb, score in zip(micro_batches, scores):
                mb.token_values_T[name] = score.logprobs_T
                if name == "old_logprobs":
                    mask = mb.loss_mask_T.bool()
                    diff = (score.logprobs_T[mask] - mb.token_values_T["rollout_logprobs"][mask]).abs()
                    sums["abs_diff_sum"] += float(diff.sum())
                    if diff.numel():
                        sums["abs_diff_max"] = max(sums["abs_diff_max"], float(diff.max()))
                    sums["num_tokens"] += float(mask.sum())
        return sums if self._writes_results and name == "old_logprobs" else {}

    def update(self, index: int) -> dict[str, float]:
        """One optimizer step on mini-batch `index`; its metrics on reporting ranks ({} elsewhere)."""
        micro_batches, loss_counts = self._mini_batches[index]
        result = self.actor.update(micro_batches, loss_counts)
        if not self._writes_results:
            return {}
        return {**result.metrics, "grad_norm": result.grad_norm, "lr": result.lr}

    def score(self, micro_batches: list[PackedMicroBatch]) -> dict[int, torch.Tensor]:
        """Token-aligned policy log-probs of each packed sequence, by its sample index (reporting ranks)."""
        scores = self.actor.compute_logprobs(micro_batches)
        if not self._writes_results:
            return {}
        out = {}
        for mb, score in zip(micro_batches, scores):
            out.update(zip(mb.sample_indices, mb.unpack(score.logprobs_T)))
        return out

    # ------------------------------------------------------------------ weight sync

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 only: become rank 0 (the sender) of the weight group the RolloutWorkers join."""
        from megatron_minio3.weights.sync import WeightGroup

        self.weight_group = WeightGroup(host, port, 0, world_size, backend=backend)

    def sync_weights(self) -> dict[str, float]:
        """Export the policy in buckets (collective) into this rank's targets: its own engines (hybrid) or the
        weight group (separate placement, rank 0)."""
        from megatron_minio3.weights.sync import BroadcastTarget, InProcessTarget, sync_weights

        targets = []
        if self.rollout is not None:
            targets = [InProcessTarget(engine) for engine in self.rollout.engines]
        elif self.weight_group is not None:
            targets = [BroadcastTarget(self.weight_group)]
        return sync_weights(self.exporter, targets).metrics()

    # ------------------------------------------------------------------ checkpoints

    def _optimizer_state(self, is_loading: bool) -> dict:
        return {
            OPTIMIZER_KEY: self.actor.optimizer.sharded_state_dict(self.actor.module.sharded_state_dict(),
                                                                   is_loading=is_loading),
            SCHEDULER_KEY: self.actor.scheduler.state_dict(),
        }

    def save_checkpoint(self, directory: str) -> dict[str, float]:
        """Collective: every rank writes its shards of the model into `directory`/model and of the optimizer
        and lr scheduler into `directory`/optimizer (the controller renames `directory` when all are done).
        The optimizer has state once the first optimizer step has run. Returns the state fingerprint."""
        from megatron.core import dist_checkpointing

        from megatron_minio3.convert.megatron_checkpoint import CheckpointMetadata, save_megatron_checkpoint

        metadata = CheckpointMetadata(self.actor.module.model_cfg, self.naming.name, self.hf_dtypes)
        save_megatron_checkpoint(self.actor.module, Path(directory, MODEL_DIR), metadata)
        if self.actor.scheduler.num_steps > 0:
            optimizer_dir = Path(directory, OPTIMIZER_DIR)
            if self.rank == 0:
                optimizer_dir.mkdir()
            torch.distributed.barrier()
            dist_checkpointing.save(self._optimizer_state(is_loading=False), str(optimizer_dir))
            torch.distributed.barrier()
        return self.state_fingerprint()

    def load_checkpoint(self, directory: str) -> dict[str, float]:
        """Collective: model, optimizer and lr scheduler state of this rank from a checkpoint written at any
        layout; returns the state fingerprint after loading."""
        from megatron.core import dist_checkpointing

        from megatron_minio3.convert.megatron_checkpoint import load_megatron_checkpoint

        load_megatron_checkpoint(self.actor.module, Path(directory, MODEL_DIR))  # checks the architecture too
        optimizer_dir = Path(directory, OPTIMIZER_DIR)
        if optimizer_dir.is_dir():
            loaded = dist_checkpointing.load(self._optimizer_state(is_loading=True), str(optimizer_dir))
            self.actor.optimizer.load_state_dict(loaded[OPTIMIZER_KEY])
            self.actor.scheduler.load_state_dict(loaded[SCHEDULER_KEY])
        return self.state_fingerprint()

    def state_fingerprint(self) -> dict[str, float]:
        """Sums over this rank's parameters and optimizer moments and the optimizer step count: equal before a
        save and after the load of the same checkpoint at the same layout (checked on resume)."""
        params = [p.detach().double() for p in self.actor.module.parameters()]
        moments = [
            value.double()
            for optimizer in getattr(self.actor.optimizer, "chained_optimizers", [self.actor.optimizer])
            for state in optimizer.optimizer.state.values()
            for name, value in state.items()
            if name in ("exp_avg", "exp_avg_sq")
        ]
        return {
            "param_sum": sum(float(p.sum()) for p in params),
            "param_sq_sum": sum(float(p.square().sum()) for p in params),
            "moment_sq_sum": sum(float(m.square().sum()) for m in moments),
            "optimizer_steps": float(self.actor.scheduler.num_steps),
        }

    def shutdown(self) -> None:
        if self.rollout is not None:
            self.rollout.shutdown()
        super().shutdown()
