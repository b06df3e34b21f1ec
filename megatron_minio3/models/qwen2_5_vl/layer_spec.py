"""Decoder layer spec: Transformer Engine modules when TE is importable, megatron-core's local ones otherwise.

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
    """None means: TE when installed. Asking for TE without it installed is a ValueError."""
    if use_te is None:
        return transformer_engine_available()
    if use_te and not transformer_engine_available():
        raise ValueError("model.use_te=true but transformer_engine is not installed")
    return use_te


def language_layer_spec(use_te: bool | None = None) -> ModuleSpec:
    """Layer spec of the Qwen2.5 decoder (RMSNorm, QKV bias, SwiGLU, GQA; options live in the TransformerConfig)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if resolve_use_te(use_te):
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")
