"""Qwen2.5-VL vision encoder: patch embedding, windowed/full attention blocks with 2D rotary, 2x2 merger.

A plain torch module (no tensor parallelism): it is replicated on the tensor-parallel ranks of the first
pipeline stage, each computing the same image features. Every rank receives identical gradients for it
through the language model's replicated embedding output, so no extra reduction is needed.

Layout facts the code relies on (the HF image processor produces them):
* ``pixel_values`` is [num_patches, C * T * P * P]; within one image the patches run frame by frame, then
  over 2x2 merge blocks row by row, then over the 4 patches of a block row by row. The merger therefore
  concatenates 4 consecutive patches.
* Window attention groups merge blocks into windows of ``window_size / patch_size / merge`` blocks per
  side (4 for the released models); full-attention blocks attend over a whole frame of one image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from megatron_minio3.models.qwen2_5_vl.config import VisionConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight after casting back."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()
        normed = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


@dataclass(frozen=True)
class VisionLayout:
    """Index bookkeeping of one batch of images (pure function of grid_thw and the config)."""

    patch_hw_P2: torch.Tensor  # (row, col) of each patch in its image, processor order
    window_order_M: torch.Tensor  # merge-block permutation that groups blocks window by window
    window_lengths: tuple[int, ...]  # patches per window, in permuted order
    frame_lengths: tuple[int, ...]  # patches per (image, frame): the full-attention segments


def vision_layout(grid_thw_N3: torch.Tensor, cfg: VisionConfig) -> VisionLayout:
    """Patch coordinates, the window permutation and the attention segments of a batch of images."""
    merge = cfg.spatial_merge_size
    blocks_per_window = cfg.window_size // merge // cfg.patch_size
    if blocks_per_window < 1:
        raise ValueError(
            f"vision window_size {cfg.window_size} is smaller than one merge block "
            f"({merge} x patch_size {cfg.patch_size})"
        )
    patch_hw = []
    window_order = []
    window_lengths: list[int] = []
    frame_lengths: list[int] = []
    first_block = 0
    for image_index, (t, h, w) in enumerate(grid_thw_N3.tolist()):
        if h % merge or w % merge:
            raise ValueError(f"image_grid_thw[{image_index}] = {(t, h, w)}: h, w must be multiples of {merge}")
        rows, cols = h // merge, w // merge
        # Patch coordinates in processor order: block row, block col, then row/col inside the block.
        block_row = torch.arange(rows).view(rows, 1, 1, 1)
        block_col = torch.arange(cols).view(1, cols, 1, 1)
        in_row = torch.arange(merge).view(1, 1, merge, 1)
        in_col = torch.arange(merge).view(1, 1, 1, merge)
        shape = (rows, cols, merge, merge)
        patch_row = (block_row * merge + in_row).expand(shape).reshape(-1)
        patch_col = (block_col * merge + in_col).expand(shape).reshape(-1)
        patch_hw.append(torch.stack([patch_row, patch_col], dim=-1).repeat(t, 1))

        block_ids = torch.arange(rows * cols).view(rows, cols)
        for frame in range(t):
            frame_lengths.append(h * w)
            for row0 in range(0, rows, blocks_per_window):
                for col0 in range(0, cols, blocks_per_window):
                    window = block_ids[row0 : row0 + blocks_per_window, col0 : col0 + blocks_per_window]
                    window_order.append(window.reshape(-1) + first_block + frame * rows * cols)
                    window_lengths.append(window.numel() * merge * merge)
        first_block += t * rows * cols
    return VisionLayout(
        patch_hw_P2=torch.cat(patch_hw),
        window_order_M=torch.cat(window_order),
        window_lengths=tuple(window_lengths),
        frame_lengths=tuple(frame_lengths),
    )


def segment_attention(
    query_PHD: torch.Tensor, key_PHD: torch.Tensor, value_PHD: torch.Tensor, lengths: tuple[int, ...]
) -> torch.Tensor:
    """Bidirectional attention inside each contiguous segment; segments of equal length run batched."""
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    assert starts[-1] == query_PHD.shape[0], "segment lengths must cover the sequence"
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts[:-1], lengths):
        if length:
            by_length.setdefault(length, []).append(start)
    out_PHD = torch.empty_like(query_PHD)
    for length, group_starts in by_length.items():
        index_GL = (torch.tensor(group_starts).view(-1, 1) + torch.arange(length).view(1, -1)).to(query_PHD.device)
        q, k, v = (x[index_GL].transpose(1, 2) for x in (query_PHD, key_PHD, value_PHD))  # [G, H, L, D]
        out_GLHD = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        out_PHD = out_PHD.index_put((index_GL.reshape(-1),), out_GLHD.reshape(-1, *out_GLHD.shape[2:]))
    return out_PHD


def apply_rotary(x_PHD: torch.Tensor, cos_PD: torch.Tensor, sin_PD: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding, computed in fp32."""
    x = x_PHD.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos_PD[:, None, :] + rotated * sin_PD[:, None, :]).to(x_PHD.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True, dtype=dtype)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True, dtype=dtype)

    def forward(
        self, x_PC: torch.Tensor, cos_PD: torch.Tensor, sin_PD: torch.Tensor, lengths: tuple[int, ...]
    ) -> torch.Tensor:
        num_patches = x_PC.shape[0]
        query, key, value = self.qkv(x_PC).view(num_patches, 3, self.num_heads, -1).unbind(1)
        query, key = apply_rotary(query, cos_PD, sin_PD), apply_rotary(key, cos_PD, sin_PD)
        out_PHD = segment_attention(query, key, value, lengths)
        return self.proj(out_PHD.reshape(num_patches, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = VisionAttention(cfg, dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = VisionMLP(cfg, dtype)

    def forward(
        self, x_PC: torch.Tensor, cos_PD: torch.Tensor, sin_PD: torch.Tensor, lengths: tuple[int, ...]
    ) -> torch.Tensor:
        x_PC = x_PC + self.attn(self.norm1(x_PC), cos_PD, sin_PD, lengths)
        return x_PC + self.mlp(self.norm2(x_PC))


class PatchMerger(nn.Module):
    """RMSNorm, then 2x2 neighbouring patches concatenated and projected to the LLM width by a GELU MLP."""

    def __init__(self, cfg: VisionConfig, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.merged_size = cfg.merged_hidden_size
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.fc1 = nn.Linear(self.merged_size, self.merged_size, bias=True, dtype=dtype)
        self.fc2 = nn.Linear(self.merged_size, cfg.out_hidden_size, bias=True, dtype=dtype)

    def forward(self, x_PC: torch.Tensor) -> torch.Tensor:
        merged_MC = self.norm(x_PC).view(-1, self.merged_size)
        return self.fc2(F.gelu(self.fc1(merged_MC)))


def vision_inverse_frequencies(cfg: VisionConfig) -> torch.Tensor:
    """Rotary frequencies of one axis: half of each head rotates with the row, half with the column."""
    axis_dim = cfg.head_dim // 2
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float) / axis_dim))


class VisionEncoder(nn.Module):
    """pixel_values [num_patches, C*T*P*P] + image_grid_thw [N, 3] -> image embeddings [num_tokens, out_hidden]."""

    def __init__(self, cfg: VisionConfig, dtype: torch.dtype | None = None, *, recompute: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.recompute = recompute  # in training, each block keeps its input only and recomputes in backward
        self.patch_embed = nn.Linear(cfg.patch_input_size, cfg.hidden_size, bias=False, dtype=dtype)
        self.blocks = nn.ModuleList(VisionBlock(cfg, dtype) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, dtype)
        self.register_buffer("inv_freq", vision_inverse_frequencies(cfg), persistent=False)

    def rotary_cos_sin(self, patch_hw_P2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = patch_hw_P2.to(self.inv_freq.device).float()[:, :, None] * self.inv_freq  # [P, 2, D/4]
        angles_PD = angles.flatten(1).repeat(1, 2)
        return angles_PD.cos(), angles_PD.sin()

    def forward(self, pixel_values_PX: torch.Tensor, image_grid_thw_N3: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        expected = int(image_grid_thw_N3.prod(-1).sum())
        if pixel_values_PX.shape != (expected, cfg.patch_input_size):
            raise ValueError(
                f"pixel_values shape {tuple(pixel_values_PX.shape)} does not match image_grid_thw "
                f"(expected ({expected}, {cfg.patch_input_size}))"
            )
        layout = vision_layout(image_grid_thw_N3.cpu(), cfg)
        device = pixel_values_PX.device
        unit = cfg.spatial_merge_size**2
        order_P = (layout.window_order_M.view(-1, 1) * unit + torch.arange(unit)).reshape(-1).to(device)

        x_PC = self.patch_embed(pixel_values_PX.to(self.patch_embed.weight.dtype))[order_P]
        cos_PD, sin_PD = self.rotary_cos_sin(layout.patch_hw_P2.to(device)[order_P])
        for index, block in enumerate(self.blocks):
            lengths = layout.frame_lengths if index in cfg.fullatt_block_indexes else layout.window_lengths
            if self.recompute and self.training and torch.is_grad_enabled():
                x_PC = torch.utils.checkpoint.checkpoint(block, x_PC, cos_PD, sin_PD, lengths, use_reentrant=False)
            else:
                x_PC = block(x_PC, cos_PD, sin_PD, lengths)
        merged_MC = self.merger(x_PC)
        return merged_MC[torch.argsort(layout.window_order_M.to(device))]
