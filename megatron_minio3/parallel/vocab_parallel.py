"""Log-probs and entropy of the taken tokens from vocab-parallel logits, without gathering the vocabulary.

Each tensor-parallel rank holds logits_TV for its contiguous vocabulary slice [rank * V_local, (rank + 1) * V_local)
(megatron's ColumnParallelLinear output layer). With x = logits / temperature, per token:
    m = max_v x_v,  S = sum_v exp(x_v - m),  log p_v = x_v - m - log S
    logprob = x_target - m - log S
    entropy = -sum_v p_v log p_v = log S - sum_v exp(x_v - m) (x_v - m) / S
Three reductions over the TP group: MAX of the local maxima, then one SUM of (local S, local sum exp*(x - m),
local target logit (0 off the owning rank)), stacked in one tensor. Backward is local (no communication):
    d logprob / d x_v = 1[v = target] - p_v
    d entropy / d x_v = -p_v (log p_v + entropy)
and d / d logits = (d / d x) / temperature. Columns at or beyond `vocab_size` (megatron's vocabulary padding)
are excluded from the distribution and get zero gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _tp_group_of_megatron() -> dist.ProcessGroup | None:
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_group() if mpu.model_parallel_is_initialized() else None


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """Memory: forward keeps x - m ([T, V_local], saved for backward) plus one exp buffer; backward two buffers."""

    @staticmethod
    def forward(ctx, logits_TV, targets_T, temperature, vocab_start, num_valid_columns, group):
        compute_dtype = torch.promote_types(logits_TV.dtype, torch.float32)
        # A fresh tensor (division), so the in-place subtraction below never touches the caller's logits.
        shifted_TV = logits_TV[:, :num_valid_columns].to(compute_dtype) / temperature
        # Local max; -inf on a rank whose slice is all padding (the global max always comes from some rank).
        if num_valid_columns > 0:
            max_T = shifted_TV.max(dim=-1).values
        else:
            max_T = torch.full(targets_T.shape, float("-inf"), dtype=compute_dtype, device=logits_TV.device)
        if group is not None:
            dist.all_reduce(max_T, op=dist.ReduceOp.MAX, group=group)
        shifted_TV -= max_T[:, None]

        local_index_T = targets_T - vocab_start
        owned_T = (local_index_T >= 0) & (local_index_T < num_valid_columns)
        safe_index_T = torch.where(owned_T, local_index_T, torch.zeros_like(local_index_T))
        if num_valid_columns > 0:
            target_shifted_T = shifted_TV.gather(-1, safe_index_T[:, None]).squeeze(-1)
        else:
            target_shifted_T = torch.zeros_like(max_T)
        exp_TV = shifted_TV.exp()
        local_sum_exp_T = exp_TV.sum(-1)
        local_sum_exp_shifted_T = exp_TV.mul_(shifted_TV).sum(-1)
        del exp_TV
        sums_3T = torch.stack(
            [local_sum_exp_T, local_sum_exp_shifted_T, torch.where(owned_T, target_shifted_T, 0.0)]
        )
        if group is not None:
            dist.all_reduce(sums_3T, op=dist.ReduceOp.SUM, group=group)
        sum_exp_T, sum_exp_shifted_T, target_shifted_T = sums_3T.unbind(0)

        log_sum_exp_T = sum_exp_T.log()
        logprobs_T = target_shifted_T - log_sum_exp_T
        entropy_T = log_sum_exp_T - sum_exp_shifted_T / sum_exp_T

        ctx.save_for_backward(shifted_TV, log_sum_exp_T, entropy_T, safe_index_T, owned_T)
        ctx.temperature = temperature
        ctx.logits_shape = logits_TV.shape
        ctx.logits_dtype = logits_TV.dtype
        return logprobs_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logprobs_T, grad_entropy_T):
        shifted_TV, log_sum_exp_T, entropy_T, safe_index_T, owned_T = ctx.saved_tensors
        if grad_logprobs_T is None:
            grad_logprobs_T = torch.zeros_like(entropy_T)
        if grad_entropy_T is None:
            grad_entropy_T = torch.zeros_like(entropy_T)
        # d/dx_v = -p_v * (g_logprob + g_entropy * (log p_v + entropy)) + g_logprob * 1[v = target]
        coefficient_TV = shifted_TV - log_sum_exp_T[:, None]  # log p
        p_TV = coefficient_TV.exp()
        coefficient_TV.add_(entropy_T[:, None]).mul_(grad_entropy_T[:, None]).add_(grad_logprobs_T[:, None])
        grad_x_TV = p_TV.mul_(coefficient_TV).neg_()
        del coefficient_TV
        if grad_x_TV.shape[1] > 0:
            grad_x_TV.scatter_add_(-1, safe_index_T[:, None], torch.where(owned_T, grad_logprobs_T, 0.0)[:, None])
        grad_x_TV.div_(ctx.temperature)
        if grad_x_TV.shape == ctx.logits_shape and grad_x_TV.dtype == ctx.logits_dtype:
            return grad_x_TV, None, None, None, None, None
        grad_logits_TV = torch.zeros(ctx.logits_shape, dtype=ctx.logits_dtype, device=grad_x_TV.device)
        grad_logits_TV[:, : grad_x_TV.shape[1]] = grad_x_TV
        return grad_logits_TV, None, None, None, None, None


def vocab_parallel_logprobs_and_entropy(
    logits_TV: Tensor,
    targets_T: Tensor,
    temperature: float = 1.0,
    *,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probs [T] of `targets_T` and entropies [T] of softmax(logits / temperature).

    logits_TV: this rank's vocabulary slice [T, V_local]; computed and returned in float32 (float64 stays
      float64), so bf16 logits give float32 log-probs.
    targets_T: global token ids in [0, vocab_size).
    vocab_size: the real vocabulary size; columns of the (padded) partition beyond it are excluded.
      Defaults to V_local * tp_size (no padding).
    tp_group: the tensor-parallel group; defaults to megatron's when parallel_state is initialised, otherwise
      the logits are taken as the whole vocabulary (one rank).
    Differentiable w.r.t. logits_TV through both outputs.
    """
    if logits_TV.dim() != 2 or targets_T.dim() != 1 or targets_T.shape[0] != logits_TV.shape[0]:
        raise ValueError(
            f"expected logits [T, V_local] and targets [T], got {tuple(logits_TV.shape)} and {tuple(targets_T.shape)}"
        )
    if targets_T.dtype.is_floating_point or targets_T.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets_T.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    group = tp_group if tp_group is not None else _tp_group_of_megatron()
    tp_size = dist.get_world_size(group) if group is not None else 1
    tp_rank = dist.get_rank(group) if group is not None else 0
    num_local_columns = logits_TV.shape[1]
    padded_vocab_size = num_local_columns * tp_size
    vocab_size = padded_vocab_size if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded_vocab_size:
        raise ValueError(f"vocab_size must be in [1, {padded_vocab_size}] (V_local * tp), got {vocab_size}")
    if targets_T.numel() and (targets_T.min() < 0 or targets_T.max() >= vocab_size):
        raise ValueError(f"targets must be token ids in [0, {vocab_size}), got range "
                         f"[{int(targets_T.min())}, {int(targets_T.max())}]")
    vocab_start = tp_rank * num_local_columns
    num_valid_columns = max(0, min(num_local_columns, vocab_size - vocab_start))
    return _VocabParallelLogprobEntropy.apply(
        logits_TV, targets_T, float(temperature), vocab_start, num_valid_columns, group if tp_size > 1 else None
    )
