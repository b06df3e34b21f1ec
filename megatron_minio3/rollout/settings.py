"""Value checks of the rollout, eval and data config sections (ValueError naming the key at fault)."""
from __future__ import annotations

from megatron_minio3.config.data import DataConfig
from megatron_minio3.config.rollout import EvalConfig, RolloutConfig
from megatron_minio3.data.images import resample_from_name
from megatron_minio3.data.templates import validate_templates

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


def _at_least(section: str, name: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ValueError(f"{section}.{name} must be at least {minimum}, got {value}")


def validate_rollout_config(cfg: RolloutConfig) -> None:
    for name in ("n", "max_turns", "max_images", "max_tokens_per_turn", "tensor_parallel_size", "num_engines",
                 "max_num_seqs", "weight_bucket_mb"):
        _at_least("rollout", name, getattr(cfg, name), 1)
    _at_least("rollout", "context_reserve_tokens", cfg.context_reserve_tokens, 1)
    _at_least("rollout", "kv_cache_memory_mb", cfg.kv_cache_memory_mb, 0)
    if cfg.context_reserve_tokens >= cfg.max_total_tokens:
        raise ValueError(
            f"rollout.context_reserve_tokens ({cfg.context_reserve_tokens}) must be below rollout.max_total_tokens "
            f"({cfg.max_total_tokens})"
        )
    if cfg.temperature < 0:
        raise ValueError(f"rollout.temperature must be >= 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"rollout.top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.top_k == 0 or cfg.top_k < -1:
        raise ValueError(f"rollout.top_k must be -1 (off) or positive, got {cfg.top_k}")
    if not 0 < cfg.gpu_memory_utilization <= 1:
        raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {cfg.gpu_memory_utilization}")
    if not cfg.stop or not all(isinstance(s, str) and s for s in cfg.stop):
        raise ValueError("rollout.stop must list at least one non-empty stop string (the tool call's closing tag)")
    if cfg.logprobs_mode not in LOGPROBS_MODES:
        raise ValueError(f"rollout.logprobs_mode must be one of {LOGPROBS_MODES}, got {cfg.logprobs_mode!r}")


def validate_eval_config(cfg: EvalConfig) -> None:
    for name in ("k", "max_turns", "max_images", "num_prompts_per_batch"):
        _at_least("eval", name, getattr(cfg, name), 1)
    _at_least("eval", "max_prompts", cfg.max_prompts, 0)
    if cfg.temperature < 0:
        raise ValueError(f"eval.temperature must be >= 0, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"eval.top_p must be in (0, 1], got {cfg.top_p}")


def validate_data_config(cfg: DataConfig) -> None:
    _at_least("data", "min_pixels", cfg.min_pixels, 1)
    if cfg.max_pixels < cfg.min_pixels:
        raise ValueError(f"data.max_pixels ({cfg.max_pixels}) must be at least data.min_pixels ({cfg.min_pixels})")
    resample_from_name(cfg.image_resample, "data.image_resample")
    resample_from_name(cfg.crop_resample, "data.crop_resample")
    validate_templates(cfg)
