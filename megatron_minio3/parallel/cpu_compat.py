"""Run megatron-core on a machine without CUDA (tests, the CPU demo).

This module is the only place in the code base that knows megatron-core assumes CUDA. Activation is a
no-op when CUDA is available, so GPU runs are untouched. What it does on a CPU-only machine:

* ``torch.cuda.current_device`` / ``synchronize`` / ``manual_seed`` / ``get_rng_state`` stop failing: megatron
  calls them directly (activation recompute saves the CUDA RNG state; there is none, and no dropout) (``current_device`` is used as a ``device=`` argument, so it must name something usable).
* A ``TorchFunctionMode`` maps every ``device="cuda"``-like argument (``"cuda"``, ``"cuda:0"``, an
  integer index, ``torch.device("cuda")``) and ``Tensor.cuda()`` to the CPU. megatron's pipeline
  schedules and grad-clip helpers create tensors with a hard-coded CUDA device.
* The model-parallel RNG tracker is created in its "inference" mode, which forks no CUDA RNG state.
  With ``use_cpu_initialization=True`` (set by our model providers on CPU) weights are initialised as
  full master tensors from the default CPU generator and then split, so TP=1 and TP=N runs with the
  same seed start from identical full weights.

megatron's distributed optimizer and its ``clip_grad_by_total_norm_fp32`` refuse CPU tensors: CPU runs
use the plain optimizer and :func:`megatron_minio3.parallel.grad.clip_grad_norm_` instead.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_LOCK = threading.Lock()
_ACTIVE = False
_MODE: "_CudaArgumentsToCpu | None" = None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def is_cpu_compat_active() -> bool:
    return _ACTIVE


def _names_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer device index means a CUDA ordinal in torch.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaArgumentsToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch function and tensor method."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _names_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _names_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def activate_cpu_compat() -> bool:
    """Make megatron-core runnable on the CPU. Idempotent; returns True when the layer is active.

    Does nothing (and returns False) when CUDA is available.
    """
    global _ACTIVE, _MODE
    if cuda_available():
        return False
    with _LOCK:
        if _ACTIVE:
            return True
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
        torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
        torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]
        torch.cuda.manual_seed_all = lambda seed: None  # type: ignore[assignment]
        torch.cuda.empty_cache = lambda: None  # type: ignore[assignment]
        # Activation recompute saves and restores the CUDA RNG state around each recomputed layer.
        torch.cuda.random.get_rng_state = lambda device="cuda": torch.empty(0, dtype=torch.uint8)  # type: ignore
        torch.cuda.get_rng_state = torch.cuda.random.get_rng_state  # type: ignore[assignment]
        _MODE = _CudaArgumentsToCpu()
        _MODE.__enter__()
        _ACTIVE = True
    return True
