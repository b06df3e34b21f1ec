"""Supervised fine-tuning loss: negative log-likelihood of the assistant tokens (pure tensor function).

The loss of a batch is the token mean over all its loss tokens, across micro-batches and ranks:
`sft_loss` returns one micro-batch's share, -sum(logp * mask) / global_num_tokens, so the batch loss is the
plain sum of the shares and does not depend on how the batch was split (the same convention as policy_loss).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class SftLossOutput:
    loss: Tensor  # this micro-batch's share of the batch loss (scalar)
    num_tokens: Tensor  # loss tokens in this micro-batch


def sft_loss(logprobs_T: Tensor, loss_mask_T: Tensor, global_num_tokens: int) -> SftLossOutput:
    """logprobs_T: log-probability of each label; loss_mask_T: 1 where the label is an assistant token."""
    if logprobs_T.shape != loss_mask_T.shape:
        raise ValueError(f"logprobs {tuple(logprobs_T.shape)} and loss_mask {tuple(loss_mask_T.shape)} differ")
    if global_num_tokens < 1:
        raise ValueError(f"global_num_tokens must be >= 1, got {global_num_tokens}")
    mask = loss_mask_T.to(logprobs_T.dtype)
    loss = -(logprobs_T * mask).sum() / global_num_tokens
    return SftLossOutput(loss=loss, num_tokens=mask.sum().detach())
