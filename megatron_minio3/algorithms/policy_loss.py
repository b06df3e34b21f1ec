"""GRPO / PPO clipped policy loss with selectable aggregation (pure tensor functions, no notion of ranks).

Per token t with ratio rho_t = exp(logprobs_t - old_logprobs_t) and advantage A_t:
    l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - clip_low, 1 + clip_high))
          - entropy_coef * H_t + kl_coef * KL_t
Aggregation over the loss tokens of a mini-batch (M = loss tokens, n_s = loss tokens of sequence s, S = the
sequences with >= 1 loss token, or every sequence of the mini-batch with algorithm.seq_mean_denominator=all):
    token-mean:           sum_t l_t / M
    seq-mean-token-mean:  sum_s (sum_{t in s} l_t / n_s) / S          (Mini-o3: with S = every sequence)
    seq-mean-token-sum:   sum_s (sum_{t in s} l_t) / S
Every mode is a weighted sum sum_t w_t l_t with w_t depending only on M, S and n_s, so a mini-batch split into
micro-batches (and ranks) gives the same summed loss and gradients when the global M and S are passed in and
every sequence lies whole inside one call. Metrics are token-means over the loss tokens with the same global M,
so they too add up over micro-batches and ranks to the mini-batch value.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_minio3.algorithms.kl import MAX_ABS_LOG_RATIO, kl_penalty
from megatron_minio3.config.algorithm import LOSS_AGG_MODES, SEQ_MEAN_DENOMINATORS


@dataclass(frozen=True)
class LossCounts:
    """Normalisers of the loss: loss tokens (M) and the sequences the seq-mean modes divide by (S: those with at
    least one loss token, or every sequence with seq_mean_denominator="all")."""

    num_tokens: int
    num_seqs: int


@dataclass(frozen=True)
class PolicyLossMetrics:
    """Detached token-mean shares over the loss tokens (sum them over micro-batches and ranks)."""

    pg_loss: Tensor
    clip_fraction: Tensor  # share of loss tokens where the clipped branch is the active one
    ppo_kl: Tensor  # k1 estimate of KL(old || new): mean of old_logprobs - logprobs
    entropy: Tensor | None  # when `entropy` is given
    kl: Tensor | None  # KL to the reference, when `ref_logprobs` is given

    def as_dict(self) -> dict[str, Tensor]:
        names = ("pg_loss", "clip_fraction", "ppo_kl", "entropy", "kl")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


@dataclass(frozen=True)
class PolicyLossOutput:
    loss: Tensor  # scalar with grad: this call's share of the mini-batch loss
    metrics: PolicyLossMetrics


def _flat_seq_index(loss_mask: Tensor, seq_ids: Tensor | None, need_seqs: bool) -> Tensor | None:
    """Dense sequence index [T] (0..S-1) for the flattened inputs, or None when not needed."""
    if seq_ids is None:
        if loss_mask.dim() == 2:
            seq_ids = torch.arange(loss_mask.shape[0], device=loss_mask.device)[:, None].expand_as(loss_mask)
        elif need_seqs:
            raise ValueError("seq_ids is required for flat (1-D) inputs; 2-D inputs use one sequence per row")
        else:
            return None
    if seq_ids.shape != loss_mask.shape:
        raise ValueError(f"seq_ids {tuple(seq_ids.shape)} must be shaped like loss_mask {tuple(loss_mask.shape)}")
    return torch.unique(seq_ids.reshape(-1), return_inverse=True)[1]


def count_loss_tokens_and_seqs(
    loss_mask: Tensor, seq_ids: Tensor | None = None, *, seq_mean_denominator: str = "with_loss_tokens"
) -> LossCounts:
    """Local normalisers; sum them over micro-batches and ranks to get the global ones. `seq_mean_denominator`:
    "with_loss_tokens" counts the sequences with a loss token, "all" every sequence (row, or distinct seq id)."""
    if seq_mean_denominator not in SEQ_MEAN_DENOMINATORS:
        raise ValueError(f"unknown seq_mean_denominator {seq_mean_denominator!r}; expected one of "
                         f"{SEQ_MEAN_DENOMINATORS}")
    mask_T = _as_bool_mask(loss_mask).reshape(-1)
    seq_index_T = _flat_seq_index(loss_mask, seq_ids, need_seqs=True)
    tokens_per_seq_S = torch.bincount(seq_index_T, weights=mask_T.to(torch.float64))
    counted_S = tokens_per_seq_S >= 0 if seq_mean_denominator == "all" else tokens_per_seq_S > 0
    return LossCounts(num_tokens=int(mask_T.sum().item()), num_seqs=int(counted_S.sum().item()))


def _as_bool_mask(loss_mask: Tensor) -> Tensor:
    if loss_mask.dtype == torch.bool:
        return loss_mask
    if not ((loss_mask == 0) | (loss_mask == 1)).all():
        raise ValueError("loss_mask must contain only 0 and 1")
    return loss_mask != 0


def aggregation_weights(
    mask_T: Tensor,
    agg_mode: str,
    seq_index_T: Tensor | None,
    global_num_tokens: int | None,
    global_num_seqs: int | None,
    seq_num_tokens_T: Tensor | None = None,
) -> Tensor:
    """Per-token weights w_t (float64, 0 off the mask) such that the aggregated loss is sum_t w_t * l_t.
    seq_num_tokens_T: n_s of each token's sequence when this call sees only part of the sequences' tokens
    (context parallelism); else counted here."""
    if agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown agg_mode {agg_mode!r}; expected one of {LOSS_AGG_MODES}")
    mask64_T = mask_T.to(torch.float64)
    if agg_mode == "token-mean":
        num_tokens = int(mask_T.sum().item()) if global_num_tokens is None else global_num_tokens
        return mask64_T / max(num_tokens, 1)
    assert seq_index_T is not None
    tokens_per_seq_S = torch.bincount(seq_index_T, weights=mask64_T)
    num_seqs = int((tokens_per_seq_S > 0).sum().item()) if global_num_seqs is None else global_num_seqs
    if agg_mode == "seq-mean-token-sum":
        return mask64_T / max(num_seqs, 1)
    per_token_n = tokens_per_seq_S[seq_index_T] if seq_num_tokens_T is None else seq_num_tokens_T.to(torch.float64)
    return mask64_T / (per_token_n.reshape(-1).clamp(min=1) * max(num_seqs, 1))


def _check_global_count(name: str, global_count: int | None, local_count: int) -> None:
    if global_count is not None and global_count < local_count:
        raise ValueError(
            f"{name}={global_count} is smaller than the count in this micro-batch alone ({local_count}); "
            "pass the count summed over all micro-batches and ranks of the mini-batch"
        )


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    clip_low: float,
    clip_high: float,
    agg_mode: str,
    *,
    seq_ids: Tensor | None = None,
    global_num_tokens: int | None = None,
    global_num_seqs: int | None = None,
    seq_num_tokens: Tensor | None = None,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> PolicyLossOutput:
    """Clipped policy loss of one micro-batch and its metrics.

    All per-token inputs share one shape: [B, L] (one sequence per row unless `seq_ids` says otherwise) or a
    flat packed [T] stream with `seq_ids` [T]. Values off the loss mask are ignored (they may be NaN).
    `global_num_tokens` / `global_num_seqs` are the mini-batch's M and S over all micro-batches and ranks
    (`count_loss_tokens_and_seqs` summed; S may count sequences without loss tokens, seq_mean_denominator="all");
    left None they default to this call's own loss tokens and sequences with a loss token. `seq_num_tokens`
    (per token, like logprobs): the loss tokens n_s of each token's whole sequence, for a call that sees only part
    of each sequence (context parallelism); left None, n_s is counted in this call.
    """
    per_token_inputs = {"old_logprobs": old_logprobs, "advantages": advantages, "loss_mask": loss_mask}
    if entropy is not None:
        per_token_inputs["entropy"] = entropy
    if ref_logprobs is not None:
        per_token_inputs["ref_logprobs"] = ref_logprobs
    if seq_num_tokens is not None:
        per_token_inputs["seq_num_tokens"] = seq_num_tokens
    for name, tensor in per_token_inputs.items():
        if tensor.shape != logprobs.shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} must be shaped like logprobs {tuple(logprobs.shape)}")
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low} and {clip_high}")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef is non-zero but no entropy was given")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError("kl_coef is non-zero but no ref_logprobs were given")

    mask_T = _as_bool_mask(loss_mask).reshape(-1)
    seq_index_T = _flat_seq_index(loss_mask, seq_ids, need_seqs=agg_mode != "token-mean")
    if global_num_tokens is not None:
        _check_global_count("global_num_tokens", global_num_tokens, int(mask_T.sum().item()))
    if global_num_seqs is not None and seq_index_T is not None:
        _check_global_count("global_num_seqs", global_num_seqs, count_loss_tokens_and_seqs(mask_T, seq_index_T).num_seqs)

    def masked(values: Tensor) -> Tensor:
        # where() rather than a product: values off the mask may be inf/NaN and must not reach the gradient.
        return torch.where(mask_T, values.reshape(-1), torch.zeros((), dtype=values.dtype, device=values.device))

    logprobs_T, old_logprobs_T, advantages_T = masked(logprobs), masked(old_logprobs), masked(advantages)
    log_ratio_T = (logprobs_T - old_logprobs_T).clamp(-MAX_ABS_LOG_RATIO, MAX_ABS_LOG_RATIO)
    ratio_T = torch.exp(log_ratio_T)
    pg_unclipped_T = -advantages_T * ratio_T
    pg_clipped_T = -advantages_T * ratio_T.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg_T = torch.maximum(pg_unclipped_T, pg_clipped_T)

    loss_T = pg_T
    entropy_T = masked(entropy) if entropy is not None else None
    kl_T = kl_penalty(logprobs_T, masked(ref_logprobs), kl_estimator) if ref_logprobs is not None else None
    if entropy_coef != 0:
        loss_T = loss_T - entropy_coef * entropy_T
    if kl_coef != 0:
        loss_T = loss_T + kl_coef * kl_T

    weights_T = aggregation_weights(mask_T, agg_mode, seq_index_T, global_num_tokens, global_num_seqs, seq_num_tokens)
    loss = (loss_T * weights_T.to(loss_T.dtype)).sum()

    token_mean_T = aggregation_weights(mask_T, "token-mean", None, global_num_tokens, None).to(logprobs_T.dtype)
    with torch.no_grad():
        metrics = PolicyLossMetrics(
            pg_loss=(pg_T * token_mean_T).sum(),
            clip_fraction=((pg_clipped_T > pg_unclipped_T).to(token_mean_T.dtype) * token_mean_T).sum(),
            ppo_kl=((old_logprobs_T - logprobs_T) * token_mean_T).sum(),
            entropy=(entropy_T * token_mean_T).sum() if entropy_T is not None else None,
            kl=(kl_T * token_mean_T).sum() if kl_T is not None else None,
        )
    return PolicyLossOutput(loss=loss, metrics=metrics)
