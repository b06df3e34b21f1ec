"""Packed micro-batches through megatron's pipeline schedule: log-probs (forward only) and the GRPO update pass.

Runs on every rank of a TP x PP x DP layout; each data-parallel rank passes its own share of micro-batches
(`PackedMiniBatch.micro_batches[dp_rank]`), the same list on every TP/PP rank of that share.

Context parallel (options.cp_size > 1): every rank of a CP group gets the same micro-batches, the model computes
the rank's shard of each (parallel.context_parallel) and the loss is taken over the shard's labels with the
mini-batch's global normalisers (n_s of the seq-mean modes from the whole micro-batch); log-probs are gathered
back to the whole micro-batch. megatron sees the CP ranks as data-parallel ranks (dp_size below is dp * cp), which
the scaling below already accounts for: the local losses of a CP group sum to the sequences' loss.

Loss scaling. `policy_loss` returns each micro-batch's share of the mini-batch loss (normalised by the global
token / sequence counts), so the mini-batch loss is the plain SUM over micro-batches and ranks. megatron's
schedule divides what the loss function returns by the number of micro-batches (and multiplies by the CP size),
and its DDP pre-scales gradients by 1 / (DP * CP) before summing them. The loss handed to megatron is
therefore multiplied by num_microbatches * dp_size, which makes the reduced gradient exactly the gradient of
the summed loss, however the mini-batch was split.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as mpu
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from megatron_minio3.algorithms.policy_loss import LossCounts, policy_loss
from megatron_minio3.algorithms.sft_loss import sft_loss
from megatron_minio3.config.algorithm import AlgorithmConfig
from megatron_minio3.models.qwen2_5_vl.attention import ShardedSeqParams
from megatron_minio3.packing.thd import PackedMicroBatch
from megatron_minio3.parallel.context_parallel import ContextShard, ImageSharding, make_shard, unshard
from megatron_minio3.parallel.vocab_parallel import vocab_parallel_logprobs_and_entropy


@dataclass(frozen=True)
class ForwardOptions:
    temperature: float  # the rollout's sampling temperature (Mini-o3: 1.0)
    vocab_size: int  # real vocabulary size; padded columns of the output layer are excluded
    device: torch.device
    # THD attention with cu_seqlens (TE, or our PackedAttention on the local spec); False: a [T, T] block-causal
    # mask, only for measuring the masked baseline (tools/bench/actor_step.py)
    use_thd: bool = True
    cp_size: int = 1  # context parallel: every rank computes 1/cp of each micro-batch's tokens
    cp_rank: int = 0
    cp_group: torch.distributed.ProcessGroup | None = None
    images: ImageSharding | None = None  # TP x CP ranks sharing a micro-batch: each encodes part of its images


def context_shard(mb: PackedMicroBatch, options: ForwardOptions) -> ContextShard | None:
    """This rank's share of the micro-batch's tokens under context parallelism; None at cp = 1."""
    if options.cp_size == 1:
        return None
    return make_shard(mb.cu_seqlens_padded, options.cp_size, options.cp_rank, options.cp_group)


def model_inputs(mb: PackedMicroBatch, options: ForwardOptions, shard: ContextShard | None = None) -> dict:
    """Keyword arguments of Qwen2_5_VLModel.forward for one packed micro-batch (batch of one, S = T)."""
    device = options.device

    def move(tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None else tensor.to(device)

    if shard is not None and not options.use_thd:
        raise ValueError("context parallelism needs THD attention (use_thd=True)")
    packed = None
    if options.use_thd:
        cu = mb.cu_seqlens_padded if shard is None else shard.local_cu_seqlens
        max_len = mb.max_seqlen_padded // options.cp_size
        packed = ShardedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                                  cu_seqlens_kv_padded=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len,
                                  shard=shard, images=options.images)
    return dict(
        input_ids=mb.input_ids_T[None].to(device),
        position_ids=mb.position_ids_3T[:, None, :].to(device),
        attention_mask=None if options.use_thd else mb.attention_mask().to(device),
        packed_seq_params=packed,
        pixel_values=move(mb.pixel_values),
        image_grid_thw=move(mb.image_grid_thw),
    )


def sum_vision_grads_over_tensor_parallel(model: torch.nn.Module, options: ForwardOptions) -> None:
    """With images shared out over TP ranks, each TP rank's vision-tower gradients hold only its own images' part;
    sum them over the TP group (DDP has summed them over dp * cp already). The tower is replicated over TP, so
    every TP rank then holds the same, whole gradient. A no-op at tp = 1, off the first stage, or frozen."""
    vision = getattr(getattr(model, "module", model), "vision_model", None)
    shared_out = options.images is not None and options.use_thd  # the masked baseline encodes everything everywhere
    if not shared_out or vision is None or mpu.get_tensor_model_parallel_world_size() == 1:
        return
    grads = [p.main_grad for p in vision.parameters() if p.requires_grad]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=mpu.get_tensor_model_parallel_group())
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def _local(values_T: Tensor, shard: ContextShard | None) -> Tensor:
    """The shard's entries of a per-position [T] tensor of the micro-batch (all of them without CP)."""
    return values_T if shard is None else values_T[shard.index_T.to(values_T.device)]


def _run_schedule(
    model: torch.nn.Module,
    micro_batches: list[PackedMicroBatch],
    options: ForwardOptions,
    make_loss_func: Callable[[PackedMicroBatch], Callable],
    forward_only: bool,
) -> list:
    if not micro_batches:
        raise ValueError("no micro-batches for this rank: every data-parallel rank needs at least one sequence")
    micro_batch_iter = iter(micro_batches)

    def forward_step(data_iterator, step_model):
        mb = next(data_iterator)
        shard = context_shard(mb, options)
        output = step_model(**model_inputs(mb, options, shard), runtime_gather_output=False)
        return output, make_loss_func(mb, shard)

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=micro_batch_iter,
        model=[model],
        num_microbatches=len(micro_batches),
        seq_length=max(mb.num_tokens for mb in micro_batches) // options.cp_size,
        micro_batch_size=1,
        forward_only=forward_only,
        collect_non_loss_data=forward_only,
    )


@dataclass(frozen=True)
class TokenScores:
    """Label-aligned [T] float32 values of one micro-batch (see packing.thd)."""

    logprobs_T: Tensor
    entropy_T: Tensor


@torch.no_grad()
def forward_logprobs(
    model: torch.nn.Module, micro_batches: list[PackedMicroBatch], options: ForwardOptions
) -> list[TokenScores] | None:
    """Log-probs and entropies of every label of every micro-batch on last-stage ranks; None elsewhere."""
    model.eval()

    def make_loss_func(mb: PackedMicroBatch, shard: ContextShard | None):
        def scores(logits_1TV: Tensor, non_loss_data: bool = True) -> TokenScores:
            logprobs_T, entropy_T = vocab_parallel_logprobs_and_entropy(
                logits_1TV[0], _local(mb.labels_T, shard).to(logits_1TV.device), options.temperature,
                vocab_size=options.vocab_size,
            )
            if shard is not None:  # every CP rank of the group gets the whole micro-batch's scores (one gather)
                logprobs_T, entropy_T = unshard(torch.stack([logprobs_T, entropy_T], dim=-1), shard).unbind(-1)
            return TokenScores(logprobs_T=logprobs_T.cpu(), entropy_T=entropy_T.cpu())

        return scores

    outputs = _run_schedule(model, micro_batches, options, make_loss_func, forward_only=True)
    return list(outputs) if mpu.is_pipeline_last_stage() else None


METRIC_NAMES = ("loss", "pg_loss", "clip_fraction", "ppo_kl", "entropy", "kl")


def forward_backward_policy_loss(
    model: torch.nn.Module,
    micro_batches: list[PackedMicroBatch],
    loss_counts: LossCounts,
    algorithm: AlgorithmConfig,
    options: ForwardOptions,
) -> dict[str, float]:
    """Accumulate the GRPO loss gradients of this rank's micro-batches (the caller steps the optimizer).

    Every micro-batch needs label-aligned token values "old_logprobs" and "advantages" (and "ref_logprobs"
    when algorithm.kl_coef > 0). Returns the mini-batch metrics (summed over micro-batches and data-parallel
    ranks, so they are mini-batch token-means / the mini-batch loss) on last-stage ranks, {} elsewhere.
    """
    model.train()
    dp_size = mpu.get_data_parallel_world_size()
    num_micro_batches = len(micro_batches)
    use_kl = algorithm.kl_coef > 0
    if mpu.is_pipeline_last_stage():
        required = {"old_logprobs", "advantages"} | ({"ref_logprobs"} if use_kl else set())
        for index, mb in enumerate(micro_batches):
            missing = required - set(mb.token_values_T)
            if missing:
                raise ValueError(f"micro-batch {index} lacks token values {sorted(missing)} needed by the loss")

    def make_loss_func(mb: PackedMicroBatch, shard: ContextShard | None):
        def loss_func(logits_1TV: Tensor):
            device = logits_1TV.device
            values = {name: _local(value, shard).to(device) for name, value in mb.token_values_T.items()}
            logprobs_T, entropy_T = vocab_parallel_logprobs_and_entropy(
                logits_1TV[0], _local(mb.labels_T, shard).to(device), options.temperature,
                vocab_size=options.vocab_size,
            )
            # A sequence's loss tokens n_s come from the whole micro-batch: under CP a rank sees part of them.
            seq_tokens_T = None if shard is None else _local(mb.loss_tokens_per_sequence(), shard).to(device)
            out = policy_loss(
                logprobs_T,
                values["old_logprobs"].float(),
                values["advantages"].float(),
                _local(mb.loss_mask_T, shard).to(device),
                algorithm.clip_ratio_low,
                algorithm.clip_ratio_high,
                algorithm.loss_agg_mode,
                seq_ids=_local(mb.seq_ids_T, shard).to(device),
                seq_num_tokens=seq_tokens_T,
                global_num_tokens=loss_counts.num_tokens,
                global_num_seqs=loss_counts.num_seqs,
                entropy=entropy_T,
                entropy_coef=algorithm.entropy_coef,
                ref_logprobs=values["ref_logprobs"].float() if use_kl else None,
                kl_coef=algorithm.kl_coef,
                kl_estimator=algorithm.kl_estimator,
            )
            metrics = {"loss": out.loss.detach().clone(), **out.metrics.as_dict()}
            # megatron divides the returned loss by num_microbatches (in place) and DDP averages over DP
            return out.loss * (num_micro_batches * dp_size), metrics

        return loss_func

    reduced = _run_schedule(model, micro_batches, options, make_loss_func, forward_only=False)
    sum_vision_grads_over_tensor_parallel(model, options)
    if not mpu.is_pipeline_last_stage():
        return {}
    names = [name for name in METRIC_NAMES if name in reduced[0]]
    summed = torch.stack([torch.stack([m[name].float() for name in names]) for m in reduced]).sum(0)
    torch.distributed.all_reduce(summed, group=mpu.get_data_parallel_group())
    return dict(zip(names, summed.tolist()))


def forward_backward_sft_loss(
    model: torch.nn.Module, micro_batches: list[PackedMicroBatch], global_num_tokens: int, options: ForwardOptions
) -> dict[str, float]:
    """Accumulate the gradients of the SFT loss (token-mean NLL of the assistant tokens over the whole batch,
    algorithms/sft_loss.py) of this rank's micro-batches; `global_num_tokens` counts the batch's loss tokens over
    every rank. Returns {"loss", "num_tokens"} summed over micro-batches and data-parallel ranks on last-stage
    ranks, {} elsewhere. The loss scaling is forward_backward_policy_loss's (module docstring)."""
    model.train()
    dp_size = mpu.get_data_parallel_world_size()
    num_micro_batches = len(micro_batches)

    def make_loss_func(mb: PackedMicroBatch, shard: ContextShard | None):
        def loss_func(logits_1TV: Tensor):
            device = logits_1TV.device
            logprobs_T, _ = vocab_parallel_logprobs_and_entropy(
                logits_1TV[0], _local(mb.labels_T, shard).to(device), options.temperature,
                vocab_size=options.vocab_size,
            )
            out = sft_loss(logprobs_T, _local(mb.loss_mask_T, shard).to(device), global_num_tokens)
            metrics = {"loss": out.loss.detach().clone(), "num_tokens": out.num_tokens}
            return out.loss * (num_micro_batches * dp_size), metrics

        return loss_func

    reduced = _run_schedule(model, micro_batches, options, make_loss_func, forward_only=False)
    sum_vision_grads_over_tensor_parallel(model, options)
    if not mpu.is_pipeline_last_stage():
        return {}
    summed = torch.stack([torch.stack([m["loss"].float(), m["num_tokens"].float()]) for m in reduced]).sum(0)
    torch.distributed.all_reduce(summed, group=mpu.get_data_parallel_group())
    return {"loss": float(summed[0]), "num_tokens": float(summed[1])}
