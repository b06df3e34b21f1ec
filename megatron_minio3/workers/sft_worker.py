"""Ray actor of one Megatron rank for supervised fine-tuning (trainer/sft.py).

It is an ActorWorker without engines or reference model: the same policy, exporter and checkpoints (a SFT
checkpoint is a GRPO checkpoint: `actor.load=<step>/model` starts GRPO from it), plus the SFT data. Every rank
reads and renders the conversations itself (the files are on disk everywhere); the controller only sees their
lengths and decides which samples each data-parallel rank trains on in each step.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megatron_minio3.workers.actor_worker import ActorWorker


class SftWorker(ActorWorker):
    def setup_sft(self) -> dict:
        """Build the policy from the HF checkpoint (or actor.load) and the SFT samples. Returns this rank's
        coordinates and, on rank 0, every sample's (length, loss tokens) and what was left out."""
        from transformers import AutoConfig, AutoTokenizer

        from megatron_minio3.config.algorithm import AlgorithmConfig
        from megatron_minio3.convert.megatron_checkpoint import load_megatron_checkpoint
        from megatron_minio3.convert.qwen2_5_vl import detect_naming
        from megatron_minio3.convert.safetensors_io import SafetensorsReader
        from megatron_minio3.data.sharegpt import read_sft_files
        from megatron_minio3.rollout.tokens import TurnTokenizer, load_vision_spec
        from megatron_minio3.trainer.batch import ImageEncoder
        from megatron_minio3.trainer.sft_data import build_sft_samples
        from megatron_minio3.weights.export import WeightExporter, resolve_export_dtype
        from megatron_minio3.workers.actor.actor import MegatronActor

        cfg = self.cfg
        coords = self.init_parallel(tp=cfg.parallel.tp, pp=cfg.parallel.pp, cp=cfg.parallel.cp, seed=cfg.trainer.seed)
        # the schedule is rebuilt by set_total_optimizer_steps once the controller knows the step count
        self.actor = MegatronActor.from_hf(cfg.model, cfg.actor, AlgorithmConfig(), total_optimizer_steps=1,
                                           temperature=1.0)
        if cfg.actor.load:
            load_megatron_checkpoint(self.actor.module, cfg.actor.load)
        self.ref = None
        with SafetensorsReader(cfg.model) as reader:
            self.naming = detect_naming(reader.names(), where=cfg.model)
            self.hf_dtypes = {name: str(reader.dtype(name)).removeprefix("torch.") for name in reader.names()}
        self.exporter = WeightExporter(self.actor.module, self.naming, bucket_bytes=cfg.weights.bucket_mb << 20,
                                       dtype=resolve_export_dtype(cfg.weights.dtype, cfg.actor.dtype, cfg.model))
        self.images = ImageEncoder(cfg.model)
        self.image_token_id = AutoConfig.from_pretrained(cfg.model).image_token_id
        self.vision = load_vision_spec(cfg.model)
        self.merge_size = self.vision.merge_size
        turns = TurnTokenizer(AutoTokenizer.from_pretrained(cfg.model), cfg.data)
        read = read_sft_files(cfg.sft.train_files, image_dir=cfg.sft.image_dir or None, on_bad_row=cfg.sft.on_bad_row)
        self.samples, left_out = build_sft_samples(read.conversations, turns, cfg.data, self.vision, cfg.sft.max_length)
        self.phase = "train"
        report = {**coords, "writes_results": self._writes_results}
        if self.rank == 0:
            report["samples"] = [(s.length, s.num_loss_tokens) for s in self.samples]
            report["left_out"] = {**left_out, "bad_rows": len(read.skipped)}
        return report

    def set_total_optimizer_steps(self, total: int) -> None:
        from megatron_minio3.workers.actor.lr_schedule import build_lr_scheduler

        self.actor.scheduler = build_lr_scheduler(self.actor.optimizer, self.cfg.actor.optim, total)

    def sft_step(self, per_dp_rank: Sequence[Sequence[int]], global_num_tokens: int) -> dict:
        """One optimizer step: this rank's data-parallel share `per_dp_rank[dp_rank]` (sample indices) of a batch
        whose loss tokens over every rank are `global_num_tokens`. Metrics on reporting ranks, {} elsewhere."""
        from megatron_minio3.packing import pack_rank_share
        from megatron_minio3.trainer.sft_data import sft_packing_item

        indices = per_dp_rank[self.ctx.dp_rank]
        try:
            items = [sft_packing_item(self.samples[i], self.cfg.data, self.vision, self.images, self.image_token_id)
                     for i in indices]
        finally:
            self.images.clear()
        micro_batches = pack_rank_share(items, list(indices), self.cfg.actor.packing, tp_size=self.ctx.tp_size,
                                        cp_size=self.ctx.cp_size)
        result = self.actor.sft_update(micro_batches, global_num_tokens)
        if not self._writes_results:
            return {}
        return {**result.metrics, "grad_norm": result.grad_norm, "lr": result.lr,
                "num_micro_batches": float(len(micro_batches))}

    def export_hf(self, out_dir: str) -> None:
        """Collective: the policy as an HF checkpoint in `out_dir` (rank 0 writes; config files from `model`)."""
        from megatron_minio3.weights.export import save_hf_checkpoint

        save_hf_checkpoint(self.exporter, Path(out_dir), Path(self.cfg.model), overwrite=True)
