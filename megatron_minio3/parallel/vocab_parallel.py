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

Memory: the vocabulary slice is processed in chunks of `chunk_size` columns, so no [T, V_local] float32 tensor
exists at once. The forward streams over the chunks with an online log-sum-exp: per chunk c, with the running
local max m and c's max m_c, m' = max(m, m_c), r = exp(m - m'),
    S <- r S + sum_{v in c} exp(x_v - m'),   E <- r (E + (m - m') S) + sum_{v in c} exp(x_v - m') (x_v - m')
(E = sum exp(x - m)(x - m) held relative to the current max). After the MAX all-reduce gives the global max M,
the same rescaling (m' = M) moves each rank's S and E to M before the SUM all-reduce, so communication is the
same two all-reduces of T and 3T numbers. Autograd keeps only the input logits (no copy: the caller holds them)
and [T] statistics (M, log S, entropy, target index); the backward recomputes each chunk's log p_v in float32
from the logits and writes its gradient into the [T, V_local] output gradient (the logits' dtype).
Temporary memory is two [T, chunk_size] float32 buffers (float64 for float64 logits) in forward and in backward:
8 * T * chunk_size bytes, against 8 * T * V_local with one chunk (the former unchunked version also kept a float32
copy of x - m from forward to backward, 12 * T * V_local bytes in its backward).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# Columns of the vocabulary slice per chunk: two float32 [T, 4096] buffers are 32 KiB per token
# (1 GiB at 32k tokens), against 1.2 MiB per token for one float32 copy of Qwen2.5's 152k vocabulary.
DEFAULT_VOCAB_CHUNK_SIZE = 4096


def _tp_group_of_megatron() -> dist.ProcessGroup | None:
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_group() if mpu.model_parallel_is_initialized() else None


def _scaled_chunk(logits_TV: Tensor, start: int, stop: int, temperature: float, compute_dtype: torch.dtype) -> Tensor:
    """x = logits[:, start:stop] / temperature as a fresh contiguous [T, C] tensor in compute_dtype (one buffer)."""
    x_TC = logits_TV[:, start:stop].to(compute_dtype, memory_format=torch.contiguous_format, copy=True)
    if temperature != 1.0:
        x_TC.div_(temperature)
    return x_TC


def _rescale_to(
    max_T: Tensor, new_max_T: Tensor, sum_exp_T: Tensor, sum_exp_shifted_T: Tensor
) -> tuple[Tensor, Tensor]:
    """(S, E) held relative to max_T, moved to new_max_T >= max_T (both finite).

    With d = max - new_max <= 0:  S' = exp(d) S,  E' = sum exp(x - new_max)(x - new_max) = exp(d) (E + d S).
    """
    delta_T = max_T - new_max_T
    rescale_T = delta_T.exp()
    return rescale_T * sum_exp_T, rescale_T * (sum_exp_shifted_T + delta_T * sum_exp_T)


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    """Chunked over the vocabulary: two float32 [T, chunk_size] buffers at a time in forward and in backward;
    saves the input logits (not a copy) and [T] statistics."""

    @staticmethod
    def forward(ctx, logits_TV, targets_T, temperature, vocab_start, num_valid_columns, group, chunk_size):
        compute_dtype = torch.promote_types(logits_TV.dtype, torch.float32)
        num_tokens = targets_T.shape[0]
        device = logits_TV.device
        # Local statistics; a rank whose slice is all padding keeps max -inf and S = E = 0 (the global max
        # always comes from some rank).
        local_max_T = torch.full((num_tokens,), float("-inf"), dtype=compute_dtype, device=device)
        sum_exp_T = torch.zeros(num_tokens, dtype=compute_dtype, device=device)
        sum_exp_shifted_T = torch.zeros(num_tokens, dtype=compute_dtype, device=device)
        for start in range(0, num_valid_columns, chunk_size):
            x_TC = _scaled_chunk(logits_TV, start, min(start + chunk_size, num_valid_columns), temperature,
                                 compute_dtype)
            chunk_max_T = torch.maximum(local_max_T, x_TC.amax(dim=-1))
            if start > 0:
                sum_exp_T, sum_exp_shifted_T = _rescale_to(local_max_T, chunk_max_T, sum_exp_T, sum_exp_shifted_T)
            local_max_T = chunk_max_T
            x_TC.sub_(local_max_T[:, None])
            exp_TC = x_TC.exp()
            sum_exp_T += exp_TC.sum(-1)
            sum_exp_shifted_T += exp_TC.mul_(x_TC).sum(-1)
            del x_TC, exp_TC

        local_index_T = targets_T - vocab_start
        owned_T = (local_index_T >= 0) & (local_index_T < num_valid_columns)
        safe_index_T = torch.where(owned_T, local_index_T, torch.zeros_like(local_index_T))
        if num_valid_columns > 0:
            target_x_T = logits_TV.gather(-1, safe_index_T[:, None]).squeeze(-1).to(compute_dtype) / temperature
        else:
            target_x_T = torch.zeros_like(local_max_T)

        max_T = local_max_T.clone()
        if group is not None:
            dist.all_reduce(max_T, op=dist.ReduceOp.MAX, group=group)
        if num_valid_columns > 0:
            sum_exp_T, sum_exp_shifted_T = _rescale_to(local_max_T, max_T, sum_exp_T, sum_exp_shifted_T)
        sums_3T = torch.stack([sum_exp_T, sum_exp_shifted_T, torch.where(owned_T, target_x_T - max_T, 0.0)])
        if group is not None:
            dist.all_reduce(sums_3T, op=dist.ReduceOp.SUM, group=group)
        sum_exp_T, sum_exp_shifted_T, target_shifted_T = sums_3T.unbind(0)

        log_sum_exp_T = sum_exp_T.log()
        logprobs_T = target_shifted_T - log_sum_exp_T
        entropy_T = log_sum_exp_T - sum_exp_shifted_T / sum_exp_T

        ctx.save_for_backward(logits_TV, max_T, log_sum_exp_T, entropy_T, safe_index_T, owned_T)
        ctx.temperature = temperature
        ctx.num_valid_columns = num_valid_columns
        ctx.chunk_size = chunk_size
        return logprobs_T, entropy_T

    @staticmethod
    def backward(ctx, grad_logprobs_T, grad_entropy_T):
        logits_TV, max_T, log_sum_exp_T, entropy_T, safe_index_T, owned_T = ctx.saved_tensors
        temperature, num_valid_columns, chunk_size = ctx.temperature, ctx.num_valid_columns, ctx.chunk_size
        if grad_logprobs_T is None:
            grad_logprobs_T = torch.zeros_like(entropy_T)
        if grad_entropy_T is None:
            grad_entropy_T = torch.zeros_like(entropy_T)
        # Padding columns (and a slice that is all padding) get zero gradient; the others are all written below.
        allocate = torch.zeros if num_valid_columns < logits_TV.shape[1] else torch.empty
        grad_logits_TV = allocate(logits_TV.shape, dtype=logits_TV.dtype, device=logits_TV.device)
        target_grad_T = torch.where(owned_T, grad_logprobs_T, 0.0)
        for start in range(0, num_valid_columns, chunk_size):
            stop = min(start + chunk_size, num_valid_columns)
            # d/dx_v = -p_v * (g_logprob + g_entropy * (log p_v + entropy)) + g_logprob * 1[v = target]
            coefficient_TC = _scaled_chunk(logits_TV, start, stop, temperature, max_T.dtype)
            coefficient_TC.sub_(max_T[:, None]).sub_(log_sum_exp_T[:, None])  # log p
            p_TC = coefficient_TC.exp()
            coefficient_TC.add_(entropy_T[:, None]).mul_(grad_entropy_T[:, None]).add_(grad_logprobs_T[:, None])
            grad_x_TC = p_TC.mul_(coefficient_TC).neg_()
            del coefficient_TC, p_TC
            in_chunk_T = (safe_index_T >= start) & (safe_index_T < stop)
            column_T = (safe_index_T - start).clamp_(0, stop - start - 1)
            grad_x_TC.scatter_add_(-1, column_T[:, None], torch.where(in_chunk_T, target_grad_T, 0.0)[:, None])
            if temperature != 1.0:
                grad_x_TC.div_(temperature)
            grad_logits_TV[:, start:stop] = grad_x_TC
            del grad_x_TC
        return grad_logits_TV, None, None, None, None, None, None


def vocab_parallel_logprobs_and_entropy(
    logits_TV: Tensor,
    targets_T: Tensor,
    temperature: float = 1.0,
    *,
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    chunk_size: int = DEFAULT_VOCAB_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Log-probs [T] of `targets_T` and entropies [T] of softmax(logits / temperature).

    logits_TV: this rank's vocabulary slice [T, V_local]; computed and returned in float32 (float64 stays
      float64), so bf16 logits give float32 log-probs. Kept (not copied) by autograd for the backward; must
      not be modified in place before it.
    targets_T: global token ids in [0, vocab_size).
    vocab_size: the real vocabulary size; columns of the (padded) partition beyond it are excluded.
      Defaults to V_local * tp_size (no padding).
    tp_group: the tensor-parallel group; defaults to megatron's when parallel_state is initialised, otherwise
      the logits are taken as the whole vocabulary (one rank).
    chunk_size: columns of the slice processed at once (module docstring): forward and backward each hold two
      float32 [T, min(chunk_size, V_local)] temporaries. Default 4096; chunk_size >= V_local is one pass over
      the whole slice (fastest, most memory). The results do not depend on it beyond float rounding.
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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of vocabulary columns, got {chunk_size!r}")
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
        logits_TV, targets_T, float(temperature), vocab_start, num_valid_columns, group if tp_size > 1 else None,
        chunk_size,
    )
