"""Test checkpoints with sharply conditioned weights.

A freshly initialised HF model (std 0.02) has almost uniform attention and logits near 0, so a wrong
rotary position or a swapped head would barely move the logits. For parity tests we redraw every weight
at unit scale (fan-in scaled matrices, norms near 1, visible biases): attention is peaked, logits are O(1-10).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def redraw(name: str, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    if tensor.dim() == 1:
        if "norm" in name or "ln_q" in name:
            return (1.0 + 0.2 * noise).to(tensor.dtype)
        return (0.2 * noise).to(tensor.dtype)  # biases
    if "embed_tokens" in name or "lm_head" in name:
        return (0.15 * noise).to(tensor.dtype)
    fan_in = tensor[0].numel()
    return (noise / fan_in**0.5).to(tensor.dtype)


def sharpened_copy(src_dir: str | Path, dst_dir: str | Path, seed: int = 0) -> Path:
    """Copy of a single-file HF checkpoint with every weight redrawn (same names, shapes, dtypes)."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    shutil.copytree(src_dir, dst_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(src_dir / "model.safetensors"))
    redrawn = {name: redraw(name, tensors[name], generator) for name in sorted(tensors)}
    save_file(redrawn, str(dst_dir / "model.safetensors"), metadata={"format": "pt"})
    return dst_dir
