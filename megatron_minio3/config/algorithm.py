"""GRPO algorithm and sequence-packing configuration (owned by the algorithms/packing packages).

The root config references `algorithm: AlgorithmConfig`; `PackingConfig` is nested under the actor as
`actor.packing`. Defaults follow the Mini-o3 recipe (docs/minio3_recipe.md, "GRPO").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KLEstimator = Literal["k1", "k3", "mse"]
SeqMeanDenominator = Literal["with_loss_tokens", "all"]
LOSS_AGG_MODES: tuple[str, ...] = get_args(LossAggMode)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
SEQ_MEAN_DENOMINATORS: tuple[str, ...] = get_args(SeqMeanDenominator)


@dataclass
class AlgorithmConfig:
    # Advantages: A = (r - mean_group) / (std_group + adv_eps), unbiased std; without std when False.
    norm_adv_by_std: bool = True
    adv_eps: float = 1e-6
    # PPO clip range for the ratio: [1 - clip_ratio_low, 1 + clip_ratio_high] (clip-higher).
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.3
    # How per-token losses become the mini-batch loss (see docs/algorithms.md).
    loss_agg_mode: LossAggMode = "seq-mean-token-mean"
    # The sequence count S that the seq-mean-* modes divide by: with_loss_tokens counts the sequences of the
    # mini-batch that have at least one loss token; all counts every sequence of the mini-batch, over-turn-masked
    # (ignore_exceed) and empty ones included, as the original does (verl with ppo_micro_batch_size_per_gpu=1).
    # With a share f of sequences without loss tokens, `all` scales the gradient by (1 - f). token-mean divides
    # by loss tokens either way (docs/algorithms.md).
    seq_mean_denominator: SeqMeanDenominator = "with_loss_tokens"
    # KL penalty to the reference model, added to the per-token loss; 0 disables it (the recipe).
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    # Entropy bonus: loss -= entropy_coef * entropy; 0 disables it (the recipe).
    entropy_coef: float = 0.0
    # Dynamic sampling: drop groups whose reward std < dynamic_sampling_min_std or with a reward failure.
    dynamic_sampling: bool = True
    dynamic_sampling_min_std: float = 1e-4
    # Over-turn masking: exceeded trajectories get loss mask 0 (they still count in their group's stats).
    ignore_exceed: bool = True

    def validate(self) -> None:
        if self.adv_eps < 0:
            raise ValueError(f"algorithm.adv_eps must be >= 0, got {self.adv_eps}")
        if not 0 <= self.clip_ratio_low < 1:
            raise ValueError(f"algorithm.clip_ratio_low must be in [0, 1), got {self.clip_ratio_low}")
        if self.clip_ratio_high < 0:
            raise ValueError(f"algorithm.clip_ratio_high must be >= 0, got {self.clip_ratio_high}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"algorithm.loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if self.seq_mean_denominator not in SEQ_MEAN_DENOMINATORS:
            raise ValueError(f"algorithm.seq_mean_denominator must be one of {SEQ_MEAN_DENOMINATORS}, got "
                             f"{self.seq_mean_denominator!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"algorithm.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_coef < 0 or self.entropy_coef < 0:
            raise ValueError(
                f"algorithm.kl_coef and entropy_coef must be >= 0, got {self.kl_coef} and {self.entropy_coef}"
            )
        if self.dynamic_sampling_min_std < 0:
            raise ValueError(
                f"algorithm.dynamic_sampling_min_std must be >= 0, got {self.dynamic_sampling_min_std}"
            )


@dataclass
class PackingConfig:
    # Token budget of one packed (THD) micro-batch, padding included.
    max_tokens_per_microbatch: int = 16384
    # Workload model for data-parallel balancing: a * L + b * L^2 per sequence of L tokens.
    # For a dense causal decoder b / a is about 1 / (12 * hidden_size): attention costs ~2*h*L^2 FLOPs per
    # layer against ~24*h^2*L for the linear layers (2e-5 suits hidden size 3584, Qwen2.5-VL-7B).
    workload_linear_coef: float = 1.0
    workload_quadratic_coef: float = 2e-5

    def validate(self) -> None:
        if self.max_tokens_per_microbatch < 1:
            raise ValueError(f"packing.max_tokens_per_microbatch must be >= 1, got {self.max_tokens_per_microbatch}")
        if self.workload_linear_coef < 0 or self.workload_quadratic_coef < 0:
            raise ValueError(
                "packing.workload_linear_coef and workload_quadratic_coef must be >= 0, got "
                f"{self.workload_linear_coef} and {self.workload_quadratic_coef}"
            )
        if self.workload_linear_coef == 0 and self.workload_quadratic_coef == 0:
            raise ValueError("packing.workload_linear_coef and workload_quadratic_coef cannot both be 0")
