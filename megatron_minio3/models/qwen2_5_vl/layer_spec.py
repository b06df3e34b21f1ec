"""Decoder layer spec: Transformer Engine modules when TE is importable, megatron-core's local ones otherwise.

The local spec's core attention is ours (attention.PackedAttention: varlen attention over packed THD
micro-batches, no T x T mask, context parallel); everything else is megatron's.

Both specs produce the same distributed-checkpoint keys (the local spec maps its separate norms onto the
TE names ``self_attention.linear_qkv.layer_norm_weight`` / ``mlp.linear_fc1.layer_norm_weight``), so a
checkpoint written with one loads with the other.
"""
from __future__ import annotations

import importlib.util

from megatron.core.transformer.spec_utils import ModuleSpec


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_use_te(use_te: bool | None) -> bool:
    """None means: TE when installed, unless context parallelism is on (it runs on the local spec, whose
    PackedAttention gathers keys/values over the CP group; TE's attention would take each rank's shard for whole
    sequences). Asking for TE without it installed, or together with context parallelism, is a ValueError."""
    from megatron_minio3.parallel.context_parallel import context_parallel_group

    context_parallel = context_parallel_group() is not None
    if use_te is None:
        return transformer_engine_available() and not context_parallel
    if use_te and not transformer_engine_available():
        raise ValueError("use_te=True but transformer_engine is not installed")
    if use_te and context_parallel:
        raise ValueError("use_te=True with parallel.cp > 1: context parallelism runs on the local layer spec")
    return use_te


def language_layer_spec(use_te: bool | None = None) -> ModuleSpec:
    """Layer spec of the Qwen2.5 decoder (RMSNorm, QKV bias, SwiGLU, GQA; options live in the TransformerConfig)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    from megatron_minio3.models.qwen2_5_vl.attention import PackedAttention

    if resolve_use_te(use_te):
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = PackedAttention
    return spec
