"""Gradient-norm clipping across model-parallel ranks that works on CPU tensors.

megatron's ``clip_grad_by_total_norm_fp32`` asserts CUDA tensors; this is the path CPU runs use (and it is
correct on GPU too). Each gradient element is counted once: parameters duplicated across TP ranks
(norms, biases of row-parallel layers) only on TP rank 0, and embeddings shared between the first and
last pipeline stage only once.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    # megatron DDP accumulates into param.main_grad; plain autograd into param.grad.
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


def total_grad_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """L2 norm of all gradients of the model, summed across the model-parallel group (fp32 scalar)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    sq_sum = torch.zeros((), dtype=torch.float32)
    device = None
    for param in params:
        grad = _grad_of(param)
        if grad is None:
            continue
        device = grad.device
        if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
            sq_sum = sq_sum.to(grad.device) + grad.detach().float().pow(2).sum()
    if device is not None:
        sq_sum = sq_sum.to(device)
    if mpu.model_parallel_is_initialized() and dist.is_initialized():
        dist.all_reduce(sq_sum, group=mpu.get_model_parallel_group())
    return sq_sum.sqrt()


def clip_grad_norm_(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Scales gradients in place so that their global norm is at most ``max_norm``; returns the norm before.

    ``max_norm <= 0`` disables clipping (the norm is still returned).
    """
    params = [p for p in params if _grad_of(p) is not None]
    norm = total_grad_norm(params)
    if max_norm > 0:
        scale = max_norm / (norm + 1e-6)
        if scale < 1.0:
            for param in params:
                _grad_of(param).mul_(scale)
    return float(norm)
