"""Rollout and evaluation configuration (owned by the rollout package).

The root config refers to these sections as `rollout: RolloutConfig` and `eval: EvalConfig`. Only
dataclasses and their value checks (ValueError naming the key at fault), called by the config loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


def _at_least(section: str, name: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ValueError(f"{section}.{name} must be at least {minimum}, got {value}")


@dataclass
class RolloutConfig:
    # Sampling (recipe: n=16, temperature 1.0, top_p 1.0).
    n: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = no top-k
    # Multi-turn limits (recipe: 6 turns and 12 images in training).
    max_turns: int = 6
    max_images: int = 12  # images in a trajectory, the prompt's own images included
    max_tokens_per_turn: int = 2048
    # A prompt longer than this (tokens of the first prompt, image tokens included) is skipped and counted
    # (rollout/skipped_prompt_too_long), as the seed's data.max_prompt_length filters; 0 = only the total budget.
    max_prompt_tokens: int = 0
    # Whole trajectory (prompt + every turn); also the engine's max_model_len.
    max_total_tokens: int = 32768
    # An observation or error turn that would leave fewer than this many tokens of the budget is rolled
    # back and the trajectory is marked `exceed` (recipe: 2000).
    context_reserve_tokens: int = 2000
    stop: list[str] = field(default_factory=lambda: ["</grounding>"])
    # Constrain every assistant turn to this regex with vLLM structured outputs ("" = free generation).
    # For smoke tests and demos with untrained checkpoints, which otherwise never call the tool; the
    # constraint is part of the sampling distribution (it enters the processed log-probs), so do not
    # train on constrained samples unless the trainer applies the same mask.
    guided_regex: str = ""
    # Box values are fractions of the raw source image (recipe default); False = pixels of the resized copy.
    relative_coordinates: bool = True
    # vLLM engine.
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.6
    # KV cache size in MiB; 0 = derive it from gpu_memory_utilization (vLLM ignores that when this is set).
    # On CPU set it (e.g. 1024): vLLM CPU counts the whole process's memory against
    # gpu_memory_utilization * host RAM otherwise.
    kv_cache_memory_mb: int = 0
    seed: int = 0
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    # Log-probs after temperature/top-p, i.e. of the distribution the tokens were sampled from. They are only
    # compared with the actor's (actor/rollout_logprob_diff); the loss uses the actor's recomputed old log-probs.
    logprobs_mode: str = "processed_logprobs"
    # Colocated engines free their weights and KV cache while the actor trains (CUDA only; hybrid placement).
    enable_sleep_mode: bool = False
    num_engines: int = 1  # engines per rollout process; trajectories are spread over them
    weight_bucket_mb: int = 512  # update_weights sends tensors to the engine in buckets of about this size

    def validate(self) -> None:
        for name in ("n", "max_turns", "max_images", "max_tokens_per_turn", "tensor_parallel_size", "num_engines",
                     "max_num_seqs", "weight_bucket_mb"):
            _at_least("rollout", name, getattr(self, name), 1)
        _at_least("rollout", "context_reserve_tokens", self.context_reserve_tokens, 1)
        _at_least("rollout", "kv_cache_memory_mb", self.kv_cache_memory_mb, 0)
        _at_least("rollout", "max_prompt_tokens", self.max_prompt_tokens, 0)
        if self.context_reserve_tokens >= self.max_total_tokens:
            raise ValueError(
                f"rollout.context_reserve_tokens ({self.context_reserve_tokens}) must be below rollout.max_total_tokens "
                f"({self.max_total_tokens})"
            )
        if self.temperature < 0:
            raise ValueError(f"rollout.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"rollout.top_k must be -1 (off) or positive, got {self.top_k}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.stop or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError("rollout.stop must list at least one non-empty stop string (the tool call's closing tag)")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"rollout.logprobs_mode must be one of {LOGPROBS_MODES}, got {self.logprobs_mode!r}")


@dataclass
class EvalConfig:
    k: int = 32  # samples per question; k=1 decodes greedily
    temperature: float = 1.0  # used when k > 1
    top_p: float = 1.0  # used when k > 1
    max_turns: int = 12  # recipe: 12 turns and 12 images at evaluation
    max_images: int = 12
    max_prompts: int = 0  # evaluate only the first max_prompts questions of each file (0 = all)
    num_prompts_per_batch: int = 64  # questions whose k rollouts run at once
    output_dir: str = "outputs/eval"  # standalone evaluation; during GRPO: <trainer.output_dir>/eval/step_N
    save_trajectories: bool = True  # trajectories.jsonl plus every image (raw and model-side crops)

    def validate(self) -> None:
        for name in ("k", "max_turns", "max_images", "num_prompts_per_batch"):
            _at_least("eval", name, getattr(self, name), 1)
        _at_least("eval", "max_prompts", self.max_prompts, 0)
        if self.temperature < 0:
            raise ValueError(f"eval.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"eval.top_p must be in (0, 1], got {self.top_p}")
