"""The Megatron policy (actor) and reference model of one rank: build from HF weights, log-probs, GRPO update.

One `MegatronActor` lives on every rank of the TP x PP x DP layout (a Ray actor per rank wraps it; under
torchrun in tests). Data-parallel ranks receive their own share of packed micro-batches
(`pack_mini_batch(...).micro_batches[dp_rank]`, identical on the TP/PP ranks of that share).

GPU: megatron DDP + distributed optimizer (fp32 main params, sharded over dp * cp), grad clipping inside the
optimizer. CPU (gloo): megatron DDP + the
plain megatron optimizer, clipped with `parallel.grad.clip_grad_norm_` (megatron's clip and distributed
optimizer refuse CPU tensors).

Colocated with rollout engines, `offload_to_host` / `reload_to_device` park this rank's params, grads and
optimizer state in host memory between phases (workers/actor/offload.py; host-to-host on a CPU-only machine).
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import parallel_state as mpu
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from megatron_minio3.algorithms.policy_loss import LossCounts
from megatron_minio3.config.algorithm import AlgorithmConfig
from megatron_minio3.config.schema import ActorConfig
from megatron_minio3.convert.hf_to_megatron import load_hf_weights_into_model
from megatron_minio3.convert.qwen2_5_vl import detect_naming
from megatron_minio3.convert.safetensors_io import SafetensorsReader
from megatron_minio3.models.qwen2_5_vl.config import load_hf_config
from megatron_minio3.models.qwen2_5_vl.layer_spec import resolve_use_te
from megatron_minio3.models.qwen2_5_vl.model import ModelOptions, Qwen2_5_VLModel, build_model
from megatron_minio3.packing.thd import PackedMicroBatch
from megatron_minio3.parallel.context_parallel import context_parallel_group, image_sharding
from megatron_minio3.parallel.grad import clip_grad_norm_
from megatron_minio3.workers.actor.lr_schedule import build_lr_scheduler
from megatron_minio3.workers.actor.offload import ActorStateOffloader, HostOffloader, OffloadStats, param_tensors
from megatron_minio3.workers.actor.step import (
    ForwardOptions,
    TokenScores,
    forward_backward_policy_loss,
    forward_backward_sft_loss,
    forward_logprobs,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_model_from_hf(hf_dir: str | Path, options: ModelOptions) -> Qwen2_5_VLModel:
    """This rank's stage/shard of Qwen2.5-VL with its weights read from an HF checkpoint directory."""
    cfg = load_hf_config(hf_dir)
    model = build_model(cfg, options)
    with SafetensorsReader(hf_dir) as reader:
        load_hf_weights_into_model(model, reader, detect_naming(reader.names(), where=str(hf_dir)))
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        # packed micro-batches differ in length: the pipeline sends each activation's shape first
        model.config.variable_seq_lengths = True
    return model


def _forward_options(model: Qwen2_5_VLModel, temperature: float) -> ForwardOptions:
    """THD attention on every spec (TE, or PackedAttention on the local one); this rank's context-parallel group
    and image group."""
    group = context_parallel_group()
    return ForwardOptions(
        temperature=temperature,
        vocab_size=model.model_cfg.text.vocab_size,
        device=next(model.parameters()).device,
        cp_size=1 if group is None else torch.distributed.get_world_size(group),
        cp_rank=0 if group is None else torch.distributed.get_rank(group),
        cp_group=group,
        images=image_sharding(),
    )


@dataclass
class UpdateResult:
    metrics: dict[str, float]  # mini-batch loss and token-mean metrics (last-stage ranks; {} elsewhere)
    grad_norm: float
    lr: float


class ReferencePolicy:
    """Frozen policy for KL log-probs; optionally parked in host memory between uses.

    Parking frees the weights' device storages (host-to-host on a CPU-only machine, so the same code runs in
    tests); the parameter objects stay where they are, and come back bit-identical for each use.
    """

    def __init__(self, model: Qwen2_5_VLModel, temperature: float, offload_to_host: bool):
        self.model = model
        self.model.requires_grad_(False)
        self.options = _forward_options(model, temperature)
        self.offload_to_host = offload_to_host
        self.host_offloader = HostOffloader(lambda: param_tensors(self.model))
        if self.offload_to_host:
            self.host_offloader.offload()

    @classmethod
    def from_hf(cls, hf_dir: str | Path, dtype: str, *, temperature: float = 1.0, offload_to_host: bool = True,
                load: str | Path | None = None):
        """The HF checkpoint's policy, or, with `load`, the Megatron checkpoint there (read before parking)."""
        from megatron_minio3.convert.megatron_checkpoint import load_megatron_checkpoint

        use_te = resolve_use_te(None)
        model = build_model_from_hf(hf_dir, ModelOptions(params_dtype=DTYPES[dtype], use_te=use_te))
        if load:
            load_megatron_checkpoint(model, load)
        return cls(model, temperature, offload_to_host)

    def compute_logprobs(self, micro_batches: list[PackedMicroBatch]) -> list[TokenScores] | None:
        if self.offload_to_host:
            self.host_offloader.reload()
        try:
            return forward_logprobs(self.model, micro_batches, self.options)
        finally:
            if self.offload_to_host:
                self.host_offloader.offload()


class MegatronActor:
    """Policy model of this rank with megatron DDP, optimizer and lr scheduler."""

    def __init__(
        self,
        model: Qwen2_5_VLModel,
        actor_cfg: ActorConfig,
        algorithm: AlgorithmConfig,
        *,
        total_optimizer_steps: int,
        temperature: float = 1.0,
    ):
        self.actor_cfg = actor_cfg
        self.algorithm = algorithm
        on_gpu = torch.cuda.is_available()
        self.clip_in_optimizer = on_gpu
        # No overlap of the gradient reduce-scatter with the backward: megatron's overlap learns from the first
        # batch which parameters get a gradient in the last micro-batch and asserts the same set every batch after,
        # and multimodal micro-batches differ (a text-only micro-batch, or an image-group rank with no image of
        # its own, gives most vision parameters no gradient). Nor of the parameter all-gather: the weights go to
        # the engines right after an update, so there is no next forward to hide it behind.
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, overlap_param_gather=False,
            use_distributed_optimizer=on_gpu,
        )
        self.model = DistributedDataParallel(model.config, ddp_config, model)
        model.config.finalize_model_grads_func = finalize_model_grads
        model.config.no_sync_func = self.model.no_sync
        self.options = _forward_options(model, temperature)

        optim = actor_cfg.optim
        dtype = DTYPES[actor_cfg.dtype]
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad if self.clip_in_optimizer else 0.0,
                bf16=dtype == torch.bfloat16,
                fp16=dtype == torch.float16,
                params_dtype=dtype,
                use_distributed_optimizer=on_gpu,
            ),
            [self.model],
        )
        self.scheduler = build_lr_scheduler(self.optimizer, optim, total_optimizer_steps)
        self.host_offloader = ActorStateOffloader(self.model, self.optimizer)

    @classmethod
    def from_hf(
        cls,
        hf_dir: str | Path,
        actor_cfg: ActorConfig,
        algorithm: AlgorithmConfig,
        *,
        total_optimizer_steps: int,
        temperature: float = 1.0,
    ) -> "MegatronActor":
        actor_cfg.validate()
        algorithm.validate()
        use_te = resolve_use_te(None)
        options = ModelOptions(
            params_dtype=DTYPES[actor_cfg.dtype],
            use_te=use_te,
            freeze_vision=actor_cfg.freeze_vision_tower,
            freeze_merger=actor_cfg.freeze_merger,
            freeze_language_model=actor_cfg.freeze_language_model,
            recompute_activations=actor_cfg.recompute_activations,
            recompute_granularity=actor_cfg.recompute_granularity,
            recompute_modules=tuple(actor_cfg.recompute_modules),
        )
        model = build_model_from_hf(hf_dir, options)
        return cls(
            model, actor_cfg, algorithm, total_optimizer_steps=total_optimizer_steps,
            temperature=temperature,
        )

    @property
    def module(self) -> Qwen2_5_VLModel:
        return self.model.module

    def offload_to_host(self, *, params: bool = True, grads: bool = True, optimizer: bool = True
                        ) -> dict[str, OffloadStats]:
        """Moves the selected groups of this rank's state to host memory, freeing their device storages:
        params (weights, DDP param buffers), grads (DDP grad buffers / main_grad), optimizer (Adam state and
        fp32 main params). Groups already offloaded stay as they are. Returns what moved, per group."""
        return self.host_offloader.offload(params=params, grads=grads, optimizer=optimizer)

    def reload_to_device(self, *, params: bool = True, grads: bool = True, optimizer: bool = True
                         ) -> dict[str, OffloadStats]:
        """Brings the selected groups back, bit-identical; groups not offloaded stay as they are."""
        return self.host_offloader.reload(params=params, grads=grads, optimizer=optimizer)

    def _require_on_device(self, *groups: str) -> None:
        offloaded = [name for name in groups if self.host_offloader.offloaded[name]]
        if offloaded:
            raise ValueError(f"the actor's {', '.join(offloaded)} are offloaded to host: call reload_to_device() first")

    def compute_logprobs(
        self, micro_batches: list[PackedMicroBatch], *, temperature: float | None = None
    ) -> list[TokenScores] | None:
        """Label-aligned log-probs/entropies per micro-batch on last-stage ranks (old log-probs), None elsewhere;
        at the rollout temperature unless `temperature` is given (the parity probe scores greedy turns at 1)."""
        self._require_on_device("params")
        options = self.options if temperature is None else dataclasses.replace(self.options, temperature=temperature)
        return forward_logprobs(self.model, micro_batches, options)

    def update(self, micro_batches: list[PackedMicroBatch], loss_counts: LossCounts) -> UpdateResult:
        """One optimizer step on a mini-batch: this rank's micro-batches, the mini-batch's global counts."""
        return self._step(lambda: forward_backward_policy_loss(
            self.model, micro_batches, loss_counts, self.algorithm, self.options))

    def sft_update(self, micro_batches: list[PackedMicroBatch], global_num_tokens: int) -> UpdateResult:
        """One optimizer step of supervised fine-tuning on a batch: this rank's micro-batches, the batch's loss
        tokens over every rank (the loss is their mean NLL)."""
        return self._step(lambda: forward_backward_sft_loss(self.model, micro_batches, global_num_tokens, self.options))

    def _step(self, forward_backward) -> UpdateResult:
        self._require_on_device("params", "grads", "optimizer")
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = forward_backward()
        if self.clip_in_optimizer:
            _, grad_norm, _ = self.optimizer.step()
        else:
            grad_norm = clip_grad_norm_(self.model.parameters(), self.actor_cfg.optim.clip_grad)
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step(increment=1)
        return UpdateResult(metrics=metrics, grad_norm=float(grad_norm), lr=lr)
