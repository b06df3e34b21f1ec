"""Learning-rate schedule of the actor: megatron's OptimizerParamScheduler set up from OptimConfig.

constant: linear warmup from 0 over warmup_ratio of the optimizer steps (if any), then lr.
cosine:   the same warmup, then cosine decay from lr to min_lr at the last optimizer step.
"""
from __future__ import annotations

import math

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_minio3.config.schema import OptimConfig


def build_lr_scheduler(optimizer, optim: OptimConfig, total_optimizer_steps: int) -> OptimizerParamScheduler:
    """`optimizer`: anything with torch-style param_groups (a megatron or torch optimizer).

    Call `.step(increment=1)` after every optimizer step.
    """
    optim.validate()
    if total_optimizer_steps < 1:
        raise ValueError(f"total_optimizer_steps must be >= 1, got {total_optimizer_steps}")
    warmup_steps = int(math.floor(optim.warmup_ratio * total_optimizer_steps))
    decay_steps = max(total_optimizer_steps, warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr if optim.lr_schedule == "cosine" else optim.lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_schedule,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
