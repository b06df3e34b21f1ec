import math

import pytest
import torch

from megatron_minio3.config.schema import OptimConfig
from megatron_minio3.workers.actor.lr_schedule import build_lr_scheduler


def lrs(optim, total_steps):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    scheduler = build_lr_scheduler(optimizer, optim, total_steps)
    values = []
    for _ in range(total_steps):
        values.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return values


def test_constant_is_the_recipe_default():
    assert lrs(OptimConfig(lr=1e-6), 8) == [1e-6] * 8


def test_constant_with_warmup():
    assert lrs(OptimConfig(lr=1.0, warmup_ratio=0.25), 8) == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_cosine_with_warmup_ends_near_min_lr():
    values = lrs(OptimConfig(lr=1.0, min_lr=0.1, lr_schedule="cosine", warmup_ratio=0.2), 10)
    assert values[:3] == pytest.approx([0.0, 0.5, 1.0])
    # cosine from lr to min_lr over steps 2..10
    expected = [0.1 + 0.45 * (1 + math.cos(math.pi * (step - 2) / 8)) for step in range(2, 10)]
    assert values[2:] == pytest.approx(expected)
    assert all(a >= b for a, b in zip(values[2:], values[3:]))


def test_bad_total_steps():
    with pytest.raises(ValueError, match="total_optimizer_steps"):
        build_lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), OptimConfig(), 0)
