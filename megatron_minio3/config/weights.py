"""Weight sync (Megatron -> rollout engines) and parity-probe configuration (owned by the weights package).

The root config refers to this section as `weights: WeightsConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass

EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class WeightsConfig:
    # Full HF tensors are gathered, sent and loaded in buckets of about this size; a reload group (the tensors
    # vLLM loads into one fused module, e.g. q/k/v weights and biases) larger than this is a bucket of its own.
    # Peak extra memory of a sync is about two buckets plus the largest tensor (docs/weights.md).
    bucket_mb: int = 512
    # dtype of the exported tensors; "auto" = rollout.dtype, or the HF checkpoint's dtype when that is "auto".
    dtype: str = "auto"
    # Parity probe: greedy two-turn rollouts of a few fixed (prompt, image) pairs, scored by the actor.
    probe_every: int = 1  # run it every N training steps (after the weight sync); 0 = never
    probe_num_prompts: int = 2  # the first N prompts of the training set (the same ones every step)
    probe_max_tokens: int = 16  # tokens generated per probe turn
    probe_warn_mean_abs_diff: float = 0.05  # warn when mean |logp_train - logp_rollout| exceeds this

    def validate(self) -> None:
        for name in ("bucket_mb", "probe_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"weights.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("probe_every", "probe_num_prompts"):
            if getattr(self, name) < 0:
                raise ValueError(f"weights.{name} must be >= 0, got {getattr(self, name)}")
        if self.probe_every and not self.probe_num_prompts:
            raise ValueError("weights.probe_num_prompts must be >= 1 when weights.probe_every > 0 (set "
                             "weights.probe_every=0 to turn the probe off)")
        if self.dtype not in EXPORT_DTYPES:
            raise ValueError(f"weights.dtype must be one of {EXPORT_DTYPES}, got {self.dtype!r}")
        if not self.probe_warn_mean_abs_diff > 0:
            raise ValueError(f"weights.probe_warn_mean_abs_diff must be > 0, got {self.probe_warn_mean_abs_diff}")
