"""Core attention of the local (non-Transformer-Engine) layer spec: packed (varlen) causal attention that never
builds a T x T mask or score matrix over the packed stream, with context parallelism.

megatron's local DotProductAttention takes a [B, 1, S, S] mask and computes [B, heads, S, S] scores: for a packed
micro-batch of T tokens that is T^2 * heads floats even though only sum_i L_i^2 / 2 of them are used. This module
is the drop-in `core_attention` for the same spec (no parameters, so checkpoints are unchanged):

* THD input (megatron PackedSeqParams, qkv_format="thd", query [T, heads, d]): each slot of cu_seqlens attends
  causally to itself only. flash-attn's varlen kernel on CUDA when installed (fp16/bf16), else
  torch scaled_dot_product_attention slot by slot (flash/efficient kernels on CUDA, the CPU flash kernel on CPU).
  Cost O(sum_i L_i^2) compute, O(max_i L_i^2) memory at most (the math fallback), never O(T^2).
* With a ShardedSeqParams shard (cp > 1): the local stream holds two chunks of every slot
  (parallel.context_parallel); keys and values are all-gathered over the CP group, each local chunk attends to
  the slot's keys up to its own end with a bottom-right-aligned causal mask.
* BSHD input (no packed_seq_params): causal when attention_mask is None, else megatron's boolean mask
  (True = masked). The reference path of the parity tests; the trainer always packs.

GQA: query head h uses key/value group h // (heads / groups) (megatron's grouping).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as mpu
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_minio3.parallel.context_parallel import ContextShard, ImageSharding, chunk_owner, gather_from_context_ranks


@dataclass
class ShardedSeqParams(PackedSeqParams):
    """PackedSeqParams plus how the micro-batch is shared out: `shard`, a CP rank's tokens (the cu_seqlens are then
    the local stream's), and `images`, the group whose ranks each encode part of the images (TP x CP)."""

    shard: ContextShard | None = None
    images: ImageSharding | None = None


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _use_flash(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None


def _expand_groups(kv_SGD: Tensor, heads: int) -> Tensor:
    groups = kv_SGD.shape[-2]
    return kv_SGD if groups == heads else kv_SGD.repeat_interleave(heads // groups, dim=-2)


def _sdpa(q_LND: Tensor, k_SGD: Tensor, v_SGD: Tensor, scale: float, *, query_offset: int | None) -> Tensor:
    """[L, N, D] attention of L queries over S keys. query_offset None: no mask (full); else query i sits at key
    position query_offset + i and sees keys 0..query_offset + i (bottom-right causal when offset = S - L)."""
    heads = q_LND.shape[1]
    q = q_LND.transpose(0, 1)[None]
    k = _expand_groups(k_SGD, heads).transpose(0, 1)[None]
    v = _expand_groups(v_SGD, heads).transpose(0, 1)[None]
    L, S = q_LND.shape[0], k_SGD.shape[0]
    if query_offset == 0 and L == S:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        allowed_LS = None
        if query_offset is not None:
            allowed_LS = (torch.arange(S, device=q.device)[None, :]
                          <= query_offset + torch.arange(L, device=q.device)[:, None])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_LS, scale=scale)
    return out[0].transpose(0, 1)


def varlen_causal_attention(q_TND: Tensor, k_TGD: Tensor, v_TGD: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    """[T, N, D]: causal attention within each slot [cu_seqlens[i], cu_seqlens[i + 1]) of the packed stream."""
    if _use_flash(q_TND):
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        cu = cu_seqlens.to(device=q_TND.device, dtype=torch.int32)
        max_len = int(lengths.max())
        return _flash_varlen()(q_TND, k_TGD, v_TGD, cu, cu, max_len, max_len, softmax_scale=scale, causal=True)
    bounds = cu_seqlens.tolist()
    outs = [_sdpa(q_TND[a:b], k_TGD[a:b], v_TGD[a:b], scale, query_offset=0)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(outs) if outs else q_TND.new_zeros(q_TND.shape)


def context_parallel_attention(q_TND: Tensor, k_TGD: Tensor, v_TGD: Tensor, shard: ContextShard,
                               scale: float) -> Tensor:
    """[T/cp, N, D] causal attention of this CP rank's two chunks per slot over the whole slot's keys/values."""
    k_all = gather_from_context_ranks(k_TGD, shard.group)  # [cp, T/cp, G, D]
    v_all = gather_from_context_ranks(v_TGD, shard.group)
    cp, rank = shard.cp_size, shard.cp_rank
    local_starts = shard.local_cu_seqlens.tolist()
    flash = _flash_varlen() if _use_flash(q_TND) else None
    pieces = [chunk_owner(j, cp) for j in range(2 * cp)]  # (owner rank, its first/second chunk) of chunk j
    outs = []
    for slot, start in enumerate(local_starts[:-1]):
        c = shard.chunk_length(slot)
        if c == 0:
            continue
        k_slot = torch.cat([k_all[owner, start + half * c: start + (half + 1) * c] for owner, half in pieces])
        v_slot = torch.cat([v_all[owner, start + half * c: start + (half + 1) * c] for owner, half in pieces])
        for half, chunk in ((0, rank), (1, 2 * cp - 1 - rank)):
            q = q_TND[start + half * c: start + (half + 1) * c]
            keys, values = k_slot[: (chunk + 1) * c], v_slot[: (chunk + 1) * c]
            if flash is not None:  # flash-attn aligns the causal mask bottom-right when queries < keys
                cu_q = torch.tensor([0, c], dtype=torch.int32, device=q.device)
                cu_k = torch.tensor([0, keys.shape[0]], dtype=torch.int32, device=q.device)
                outs.append(flash(q, keys, values, cu_q, cu_k, c, keys.shape[0], softmax_scale=scale, causal=True))
            else:
                outs.append(_sdpa(q, keys, values, scale, query_offset=chunk * c))
    return torch.cat(outs) if outs else q_TND.new_zeros(q_TND.shape)


class PackedAttention(MegatronModule):
    """Drop-in `core_attention` of megatron's local layer spec (same constructor and forward signature)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else mpu.get_tensor_model_parallel_world_size()
        if config.num_attention_heads % tp or config.num_query_groups % tp:
            raise ValueError(f"{config.num_attention_heads} heads / {config.num_query_groups} groups do not split "
                             f"over tp={tp}")
        if (config.attention_dropout if attention_dropout is None else attention_dropout) != 0.0:
            raise ValueError("PackedAttention has no attention dropout (Qwen2.5-VL uses none)")
        if config.apply_query_key_layer_scaling or config.softmax_type != "vanilla":
            raise ValueError("PackedAttention supports the vanilla softmax without query-key layer scaling only")
        self.heads = config.num_attention_heads // tp
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type=None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("PackedAttention does not take an attention bias")
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed_seq_params.qkv_format must be 'thd', got {packed_seq_params.qkv_format!r}")
            shard = getattr(packed_seq_params, "shard", None)
            if shard is not None and shard.cp_size > 1:
                return context_parallel_attention(query, key, value, shard, self.scale)
            cu = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if cu is None else cu
            return varlen_causal_attention(query, key, value, cu, self.scale)
        # BSHD: [S, B, N, D] -> [B, N, S, D]
        seq, batch = query.shape[:2]
        q = query.permute(1, 2, 0, 3)
        k = _expand_groups(key, self.heads).permute(1, 2, 0, 3)
        v = _expand_groups(value, self.heads).permute(1, 2, 0, 3)
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, -1)
