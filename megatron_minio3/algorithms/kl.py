"""Per-token KL estimators between the policy and the reference model (Schulman, "Approximating KL").

With log-ratio d = logprobs - ref_logprobs of the sampled token (sampled from the policy):
    k1  = d                              unbiased, high variance, can be negative
    k3  = exp(-d) + d - 1                unbiased, low variance, always >= 0 ("low_var_kl")
    mse = d^2 / 2                        (k2) biased, low variance, >= 0
"""
from __future__ import annotations

import torch
from torch import Tensor

from megatron_minio3.config.algorithm import KL_ESTIMATORS

# exp() of a log-ratio beyond this bound overflows float32 long before it says anything useful.
MAX_ABS_LOG_RATIO = 20.0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate, same shape as the inputs; differentiable w.r.t. `logprobs`."""
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        clamped = log_ratio.clamp(-MAX_ABS_LOG_RATIO, MAX_ABS_LOG_RATIO)
        return torch.exp(-clamped) + clamped - 1.0
    if estimator == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
