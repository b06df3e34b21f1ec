"""Ray actor of one Megatron rank: the policy (MegatronActor), the reference policy, weight export, checkpoints,
and, in hybrid placement, the rollout engines of its group of ranks.

The controller calls every method on all ranks at once (workers/placement.py). The order of the work inside
a step is this class's business:

    generate_round (engine ranks)   rollout phase: actor state on host, engines awake; returns numbers only
    take_training_shares            the step's sequences, one list per data-parallel rank (Ray object refs)
    train(plan, *shares)            train phase: engines asleep, actor on device; pixels, positions and packing
                                    of this rank's share, old (and reference) log-probs, one optimizer step per
                                    mini-batch
    sync_weights                    grads and optimizer state to host, engines wake, buckets into the engines
    score_probe                     the parity probe of every engine, scored by the actor

Memory between phases (colocated, `trainer.rollout_placement: hybrid`):
    rollout   actor params, grads and optimizer state on host (actor.offload_to_host_between_phases); engines awake
    train     engines asleep (rollout.enable_sleep_mode: level 2, weights and KV cache freed; a sync follows),
              actor state on device
    sync      params on device, grads and optimizer state on host, engines awake (the sync and the probe)
A checkpoint save or load puts the engines to sleep at level 1 only (weights kept on host), since no sync
follows it. Peak resident memory of every phase is measured and reported (memory/*).

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
from megatron_minio3.trainer.batch import TrainingSequence
from megatron_minio3.trainer.logging import PhaseTimer
from megatron_minio3.trainer.step_plan import RoundSummary, SeqKey, StepPlan
from megatron_minio3.weights.probe import ProbeSequence
from megatron_minio3.workers.group import RankWorker
from megatron_minio3.workers.memory import PeakMemory

MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "lr_scheduler"

ALL_STATE = {"params": True, "grads": True, "optimizer": True}
GRADS_AND_OPTIMIZER = {"params": False, "grads": True, "optimizer": True}
PARAMS = {"params": True, "grads": False, "optimizer": False}


class ActorWorker(RankWorker):
    def __init__(self, rank: int, world_size: int, env: dict[str, str], local_rank: int, cfg: Config):
        super().__init__(rank, world_size, env, local_rank)
        self.cfg = cfg
        self.rollout = None  # RolloutRuntime on the ranks that lead an engine group (hybrid placement)
        self.weight_group = None  # separate placement, rank 0 only
        self.phase = "setup"
        self.memory = PeakMemory()

    # ------------------------------------------------------------------ set-up

    def setup(self, total_optimizer_steps: int, probe_prompts: Sequence[Prompt], handle: int | None) -> dict:
        """Build the policy (and reference) from the HF checkpoint, the exporter and, when `handle` is given
        (hybrid placement), this rank's part of the engine of rollout handle `handle`. Returns this rank's
        coordinates."""
        from transformers import AutoConfig

        from megatron_minio3.convert.megatron_checkpoint import load_megatron_checkpoint
        from megatron_minio3.convert.qwen2_5_vl import detect_naming
        from megatron_minio3.convert.safetensors_io import SafetensorsReader
        from megatron_minio3.rollout.tokens import load_vision_spec
        from megatron_minio3.trainer.batch import ImageEncoder
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
                cfg.model, cfg.actor.dtype, temperature=temperature, offload_to_host=cfg.ref.offload_to_host,
                load=cfg.actor.load or None,
            )
        with SafetensorsReader(cfg.model) as reader:
            self.naming = detect_naming(reader.names(), where=cfg.model)
            self.hf_dtypes = {name: str(reader.dtype(name)).removeprefix("torch.") for name in reader.names()}
        self.exporter = WeightExporter(
            self.actor.module,
            self.naming,
            bucket_bytes=cfg.weights.bucket_mb << 20,
            dtype=resolve_export_dtype(cfg.weights.dtype, cfg.rollout.dtype, cfg.model),
        )
        self.exporter.plan()  # collective: every rank plans now, not at the first sync
        self.images = ImageEncoder(cfg.model)
        self.image_token_id = AutoConfig.from_pretrained(cfg.model).image_token_id
        self.merge_size = load_vision_spec(cfg.model).merge_size
        if handle is not None:
            # Every rank builds its engine at the same time: vLLM creates its groups in this rank's world.
            from megatron_minio3.rollout.spmd import build_engine_groups
            from megatron_minio3.workers.rollout_worker import RolloutRuntime

            ranks_per_engine = cfg.rollout.tensor_parallel_size
            group = None
            if ranks_per_engine > 1:  # collective: every rank creates every engine's group
                group = build_engine_groups(self.ctx.world_size, ranks_per_engine)[handle]
            self._offload(ALL_STATE)  # the engine's memory profiling must see the room it will have
            self.rollout = RolloutRuntime(cfg, probe_prompts, handle=handle, group=group)
        self.phase = "rollout"
        self.memory.start("rollout")
        return {**coords, "is_last_stage": self.ctx.is_last_stage, "writes_results": self._writes_results}

    @property
    def _writes_results(self) -> bool:
        """One rank per data-parallel share reports results: the last pipeline stage's first TP/CP rank."""
        return self.ctx.is_last_stage and self.ctx.tp_rank == 0 and self.ctx.cp_rank == 0

    # ------------------------------------------------------------------ memory between phases

    def _offload(self, what: dict[str, bool]) -> None:
        if self.cfg.actor.offload_to_host_between_phases:
            self.actor.offload_to_host(**what)

    def _enter(self, phase: str, *, sleep_level: int = 2) -> None:
        """Move memory for `phase` (see the module docstring); a no-op when already there."""
        if phase == self.phase:
            return
        self.memory.start(phase)
        if phase == "train":
            if self.rollout is not None:
                self.rollout.sleep(sleep_level)
            self.actor.reload_to_device(**ALL_STATE)
        elif phase == "sync":
            self._offload(GRADS_AND_OPTIMIZER)
            self.actor.reload_to_device(**PARAMS)
            if self.rollout is not None:
                self.rollout.wake_up(["weights"])
        elif phase == "rollout":
            self._offload(ALL_STATE)
            if self.rollout is not None:
                self.rollout.wake_up()
        else:
            raise AssertionError(f"unknown phase {phase!r}")
        self.phase = phase

    # ------------------------------------------------------------------ rollout (engine ranks, hybrid)

    def generate_round(self, prompts: Sequence[Prompt], step: int, seeds: Sequence[int] | None = None,
                       next_round: tuple[Sequence[Prompt], Sequence[int]] | None = None) -> RoundSummary:
        self._enter("rollout")
        return self.rollout.generate_round(prompts, step, seeds, next_round)

    def end_generation(self) -> None:
        self.rollout.end_generation()

    def take_training_shares(self, requests: Sequence[Sequence[SeqKey]]):
        shares = self.rollout.take_training_shares(requests)
        return shares[0] if len(shares) == 1 else tuple(shares)  # one Ray return value per data-parallel rank

    def probe_rollout(self) -> list[list[ProbeSequence]]:
        self._enter_engines_awake()
        return self.rollout.probe_rollout()

    def follow(self, call: str) -> None:
        """The other ranks of an engine spanning several ranks: take part in the leader's `call`
        (generate_round, probe_rollout or evaluate) until it releases them."""
        if call == "generate_round":
            self._enter("rollout")
        else:
            self._enter_engines_awake()
        self.rollout.follow()

    def evaluate(self, output_dir: str, step: int) -> dict:
        self._enter_engines_awake()
        return self.rollout.evaluate(output_dir, step)

    def _enter_engines_awake(self) -> None:
        if self.phase == "train":  # engines asleep: bring them back without touching the actor's params
            self._enter("sync")
        if self.rollout is not None:
            self.rollout.wake_up()

    # ------------------------------------------------------------------ training

    def train(self, plan: StepPlan, *shares: list[TrainingSequence]) -> dict:
        """One step's update on this rank's share: `shares` holds, from every rollout handle, the sequences the
        plan gives this rank's data-parallel share. Returns this rank's report (see TrainingWorkers.train)."""
        self._enter("train")
        timer = PhaseTimer()
        with timer("pack"):
            mini_batches = self._pack(plan, shares)
        with timer("old_logprobs"):
            diff = self._compute_logprobs(mini_batches, "old_logprobs")
        if self.ref is not None:
            with timer("ref_logprobs"):
                self._compute_logprobs(mini_batches, "ref_logprobs")
        updates = []
        with timer("update"):
            for _ in range(self.cfg.actor.ppo_epochs):
                for micro_batches, loss_counts in mini_batches:
                    if loss_counts.num_tokens == 0:  # every sequence exceeded: nothing to learn
                        continue
                    result = self.actor.update(micro_batches, loss_counts)
                    updates.append({**result.metrics, "grad_norm": result.grad_norm, "lr": result.lr})
        return {"writes_results": self._writes_results, "updates": updates, "logprob_diff": diff,
                "timing": dict(timer.seconds)}

    def _pack(self, plan: StepPlan, shares: Sequence[list[TrainingSequence]]) -> list[tuple[list[PackedMicroBatch], LossCounts]]:
        from megatron_minio3.packing import pack_rank_share
        from megatron_minio3.trainer.batch import packing_item

        by_key = {seq.key: seq for share in shares for seq in share}
        packed = []
        try:
            for mini_batch in plan.mini_batches:
                keys = mini_batch.ranks[self.ctx.dp_rank]
                items = [packing_item(by_key[key], self.images, image_token_id=self.image_token_id,
                                      spatial_merge_size=self.merge_size) for key in keys]
                micro_batches = pack_rank_share(items, list(range(len(items))), self.cfg.actor.packing,
                                                tp_size=self.ctx.tp_size, cp_size=self.ctx.cp_size)
                packed.append((micro_batches, mini_batch.loss_counts))
        finally:
            self.images.clear()
        return packed

    def _compute_logprobs(self, mini_batches, name: str) -> dict[str, float]:
        """Store per-token log-probs of every micro-batch as token value `name`: "old_logprobs" from the policy,
        "ref_logprobs" from the reference. For old log-probs, also returns sums comparing them with the rollout
        engine's log-probs of the same tokens (reporting ranks; zeros elsewhere)."""
        model = {"old_logprobs": self.actor, "ref_logprobs": self.ref}[name]
        sums = {"abs_diff_sum": 0.0, "abs_diff_max": 0.0, "num_tokens": 0.0}
        for micro_batches, _ in mini_batches:
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
        return sums

    def score_probe(self, *per_handle: list[list[ProbeSequence]]) -> dict[int, dict[str, float]]:
        """Parity probe: every engine's greedy probe sequences (per_handle[h][e]: engine e of handle h, numbered in
        that order) scored by the policy; engine i is scored by data-parallel share i % dp. Returns per engine
        the probe metrics (weights/probe.py) on reporting ranks, {} elsewhere."""
        from megatron_minio3.packing import pack_rank_share
        from megatron_minio3.weights.probe import ParityProbe, parity_metrics

        if self.phase != "train":
            self._enter("sync")  # the policy's params on the device; the engines stay awake
        engines = [seqs for handle in per_handle for seqs in handle]
        report = {}
        for index, sequences in enumerate(engines):
            if index % self.ctx.dp_size != self.ctx.dp_rank:
                continue
            items = ParityProbe.packing_items(sequences, self.images.processor, image_token_id=self.image_token_id,
                                              spatial_merge_size=self.merge_size)
            micro_batches = pack_rank_share(items, list(range(len(items))), self.cfg.actor.packing,
                                            tp_size=self.ctx.tp_size, cp_size=self.ctx.cp_size)
            scores = self.actor.compute_logprobs(micro_batches, temperature=1.0)  # vLLM's greedy log-probs: raw
            if not self._writes_results:
                continue
            scored = {}
            for mb, score in zip(micro_batches, scores):
                scored.update(zip(mb.sample_indices, mb.unpack(score.logprobs_T)))
            metrics = parity_metrics(sequences, [scored[i] for i in range(len(sequences))])
            rollout_logprobs = [lp for seq in sequences for lp in seq.rollout_logprobs]
            metrics["probe/rollout_logprob_mean"] = sum(rollout_logprobs) / len(rollout_logprobs)
            report[index] = metrics
        return report

    # ------------------------------------------------------------------ weight sync

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 only: become rank 0 (the sender) of the weight group the RolloutWorkers join."""
        from megatron_minio3.weights.sync import WeightGroup

        self.weight_group = WeightGroup(host, port, 0, world_size, backend=backend)

    def sync_weights(self) -> dict[str, float]:
        """Export the policy in buckets (collective over all ranks) into this rank's targets: its own engines
        (hybrid; every rank receives every bucket) or the weight group (separate placement, rank 0). Returns
        the sync metrics and the peak memory of the phases since the last sync."""
        from megatron_minio3.weights.sync import BroadcastTarget, InProcessTarget, sync_weights

        self._enter("sync")
        targets = []
        if self.rollout is not None:
            targets = [InProcessTarget(engine) for engine in self.rollout.engines]
        elif self.weight_group is not None:
            targets = [BroadcastTarget(self.weight_group)]
        metrics = sync_weights(self.exporter, targets).metrics()
        if self.rollout is not None:
            self.rollout.wake_up(["kv_cache"])
        return {**metrics, **self.memory.report()}

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

        self._enter("train", sleep_level=1)
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
        layout; returns the state fingerprint after loading. A weight sync must follow (the engines started
        from the HF checkpoint)."""
        from megatron.core import dist_checkpointing

        from megatron_minio3.convert.megatron_checkpoint import load_megatron_checkpoint

        self._enter("train", sleep_level=1)
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
