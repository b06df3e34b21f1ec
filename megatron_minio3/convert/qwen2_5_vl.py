"""Qwen2.5-VL name and shape rules between HF checkpoints and our Megatron model: the single source of truth.

Megatron names here are *canonical*: the keys of the distributed checkpoint, with global layer numbers and
the Transformer Engine spelling of the fused norms (``self_attention.linear_qkv.layer_norm_weight``,
``mlp.linear_fc1.layer_norm_weight``). :func:`canonical_megatron_name` maps the local-spec module names.
A "full" Megatron tensor is the TP=1 layout: fused QKV interleaved per key/value group
([q heads of group g; k_g; v_g] for each g), fused fc1 as [gate; up].

Entry points used by conversion and by the live weight export to the rollout engine:
    megatron_to_hf(name, full_tensor, cfg, naming) -> [(hf_name, tensor), ...]
    hf_to_megatron(name, hf_tensors, cfg, naming)   -> full Megatron tensor
    parameter_rule(name, cfg, naming)                -> ParamRule (HF names, TP dim, part layout)
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from megatron_minio3.convert.tp import PartLayout
from megatron_minio3.models.qwen2_5_vl.config import Qwen2_5_VLConfig


@dataclass(frozen=True)
class HfNaming:
    """Tensor-name prefixes of a HF checkpoint layout."""

    name: str
    text_prefix: str
    vision_prefix: str
    lm_head: str = "lm_head.weight"


RELEASED = HfNaming("released", text_prefix="model.", vision_prefix="visual.")
TRANSFORMERS5 = HfNaming("transformers5", text_prefix="model.language_model.", vision_prefix="model.visual.")
NAMINGS = {n.name: n for n in (RELEASED, TRANSFORMERS5)}


def detect_naming(hf_names: Iterable[str], where: str = "checkpoint") -> HfNaming:
    names = list(hf_names)
    if any(n.startswith(TRANSFORMERS5.text_prefix) for n in names):
        return TRANSFORMERS5
    if any(n.startswith(RELEASED.text_prefix + "layers.") or n == RELEASED.text_prefix + "embed_tokens.weight" for n in names):
        return RELEASED
    raise ValueError(
        f"{where}: no Qwen2.5-VL language-model tensors found (expected names starting with "
        f"'{RELEASED.text_prefix}layers.' or '{TRANSFORMERS5.text_prefix}'); first names: {sorted(names)[:5]}"
    )


# ----------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Single:
    """The Megatron tensor is one HF tensor, unchanged."""

    def to_parts(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]

    def from_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        assert len(parts) == 1, "Single layout takes one part"
        return parts[0]


@dataclass(frozen=True)
class Reshaped:
    """The Megatron tensor is one HF tensor reshaped (the patch embedding: Conv3d kernel as a Linear)."""

    hf_tail: tuple[int, ...]  # HF shape after the first dimension

    def to_parts(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor.reshape(tensor.shape[0], *self.hf_tail)]

    def from_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        assert len(parts) == 1, "Reshaped layout takes one part"
        return parts[0].reshape(parts[0].shape[0], -1)


@dataclass(frozen=True)
class GateUp:
    """Megatron's fused SwiGLU fc1 = [gate; up] along dim 0."""

    def to_parts(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        gate, up = torch.chunk(tensor, 2, dim=0)
        return [gate, up]

    def from_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        gate, up = parts
        return torch.cat([gate, up], dim=0)


@dataclass(frozen=True)
class InterleavedQKV:
    """Megatron's fused QKV: per key/value group, that group's query heads, then its key, then its value.

    Works on full tensors and on TP shards alike (the number of groups is read from the shapes).
    """

    heads_per_group: int
    head_dim: int

    def to_parts(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        rows_per_group = (self.heads_per_group + 2) * self.head_dim
        grouped = tensor.reshape(-1, rows_per_group, *tensor.shape[1:])
        q_rows = self.heads_per_group * self.head_dim
        q, k, v = torch.split(grouped, [q_rows, self.head_dim, self.head_dim], dim=1)
        return [x.reshape(-1, *tensor.shape[1:]) for x in (q, k, v)]

    def from_parts(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        q, k, v = parts
        num_groups = k.shape[0] // self.head_dim
        rest = q.shape[1:]
        grouped = [
            q.reshape(num_groups, self.heads_per_group * self.head_dim, *rest),
            k.reshape(num_groups, self.head_dim, *rest),
            v.reshape(num_groups, self.head_dim, *rest),
        ]
        return torch.cat(grouped, dim=1).reshape(-1, *rest)


# ------------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class ParamRule:
    megatron_name: str
    megatron_shape: tuple[int, ...]  # full (TP=1) shape
    hf_names: tuple[str, ...]
    layout: PartLayout
    tp_dim: int | None  # dimension split over tensor-parallel ranks (of every HF part); None: replicated
    exported: bool = True  # False: an alias of another exported tensor (the tied output layer)

    def hf_shapes(self) -> list[tuple[int, ...]]:
        parts = self.layout.to_parts(torch.empty(self.megatron_shape, device="meta"))
        return [tuple(p.shape) for p in parts]


LAYER_PREFIX = "language_model.decoder.layers."
# Local-spec module names -> canonical (checkpoint) names.
_LOCAL_TO_CANONICAL = (
    (".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
    (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),
)


def canonical_megatron_name(name: str, layer_offset: int = 0) -> str:
    """Canonical name of a model parameter: TE norm spelling, global layer number (local + layer_offset)."""
    for local, canonical in _LOCAL_TO_CANONICAL:
        if name.endswith(local):
            name = name[: -len(local)] + canonical
    if layer_offset and name.startswith(LAYER_PREFIX):
        index, rest = name[len(LAYER_PREFIX) :].split(".", 1)
        name = f"{LAYER_PREFIX}{int(index) + layer_offset}.{rest}"
    return name


def _language_rules(cfg: Qwen2_5_VLConfig, naming: HfNaming) -> list[ParamRule]:
    text = cfg.text
    hidden, head_dim = text.hidden_size, text.head_dim
    qkv_rows = (text.num_attention_heads + 2 * text.num_kv_heads) * head_dim
    qkv = InterleavedQKV(text.num_attention_heads // text.num_kv_heads, head_dim)
    hf = naming.text_prefix
    rules = [
        ParamRule("language_model.embedding.word_embeddings.weight", (text.vocab_size, hidden),
                  (f"{hf}embed_tokens.weight",), Single(), 0),
    ]
    for i in range(text.num_layers):
        mg, hl = f"{LAYER_PREFIX}{i}.", f"{hf}layers.{i}."
        attn = f"{hl}self_attn."
        rules += [
            ParamRule(f"{mg}self_attention.linear_qkv.layer_norm_weight", (hidden,),
                      (f"{hl}input_layernorm.weight",), Single(), None),
            ParamRule(f"{mg}self_attention.linear_qkv.weight", (qkv_rows, hidden),
                      tuple(f"{attn}{p}_proj.weight" for p in "qkv"), qkv, 0),
            ParamRule(f"{mg}self_attention.linear_qkv.bias", (qkv_rows,),
                      tuple(f"{attn}{p}_proj.bias" for p in "qkv"), qkv, 0),
            ParamRule(f"{mg}self_attention.linear_proj.weight", (hidden, text.num_attention_heads * head_dim),
                      (f"{attn}o_proj.weight",), Single(), 1),
            ParamRule(f"{mg}mlp.linear_fc1.layer_norm_weight", (hidden,),
                      (f"{hl}post_attention_layernorm.weight",), Single(), None),
            ParamRule(f"{mg}mlp.linear_fc1.weight", (2 * text.intermediate_size, hidden),
                      (f"{hl}mlp.gate_proj.weight", f"{hl}mlp.up_proj.weight"), GateUp(), 0),
            ParamRule(f"{mg}mlp.linear_fc2.weight", (hidden, text.intermediate_size),
                      (f"{hl}mlp.down_proj.weight",), Single(), 1),
        ]
    rules.append(
        ParamRule("language_model.decoder.final_layernorm.weight", (hidden,), (f"{hf}norm.weight",), Single(), None)
    )
    if text.tie_word_embeddings:
        # The last pipeline stage holds a copy of the embedding as its output layer; HF stores it once.
        rules.append(ParamRule("language_model.output_layer.weight", (text.vocab_size, hidden),
                               (f"{hf}embed_tokens.weight",), Single(), 0, exported=False))
    else:
        rules.append(ParamRule("language_model.output_layer.weight", (text.vocab_size, hidden),
                               (naming.lm_head,), Single(), 0))
    return rules


def _vision_rules(cfg: Qwen2_5_VLConfig, naming: HfNaming) -> list[ParamRule]:
    vis = cfg.vision
    hv = naming.vision_prefix
    width, ffn, merged = vis.hidden_size, vis.intermediate_size, vis.merged_hidden_size

    def same(mg_suffix: str, shape: tuple[int, ...], hf_suffix: str | None = None) -> ParamRule:
        return ParamRule(f"vision_model.{mg_suffix}", shape, (f"{hv}{hf_suffix or mg_suffix}",), Single(), None)

    patch_tail = (vis.in_channels, vis.temporal_patch_size, vis.patch_size, vis.patch_size)
    rules = [
        ParamRule("vision_model.patch_embed.weight", (width, vis.patch_input_size),
                  (f"{hv}patch_embed.proj.weight",), Reshaped(patch_tail), None),
    ]
    for j in range(vis.depth):
        b = f"blocks.{j}."
        rules += [
            same(f"{b}norm1.weight", (width,)),
            same(f"{b}attn.qkv.weight", (3 * width, width)),
            same(f"{b}attn.qkv.bias", (3 * width,)),
            same(f"{b}attn.proj.weight", (width, width)),
            same(f"{b}attn.proj.bias", (width,)),
            same(f"{b}norm2.weight", (width,)),
            same(f"{b}mlp.gate_proj.weight", (ffn, width)),
            same(f"{b}mlp.gate_proj.bias", (ffn,)),
            same(f"{b}mlp.up_proj.weight", (ffn, width)),
            same(f"{b}mlp.up_proj.bias", (ffn,)),
            same(f"{b}mlp.down_proj.weight", (width, ffn)),
            same(f"{b}mlp.down_proj.bias", (width,)),
        ]
    rules += [
        same("merger.norm.weight", (width,), "merger.ln_q.weight"),
        same("merger.fc1.weight", (merged, merged), "merger.mlp.0.weight"),
        same("merger.fc1.bias", (merged,), "merger.mlp.0.bias"),
        same("merger.fc2.weight", (vis.out_hidden_size, merged), "merger.mlp.2.weight"),
        same("merger.fc2.bias", (vis.out_hidden_size,), "merger.mlp.2.bias"),
    ]
    return rules


@lru_cache(maxsize=16)
def _rules_by_name(cfg: Qwen2_5_VLConfig, naming: HfNaming) -> dict[str, ParamRule]:
    return {r.megatron_name: r for r in _language_rules(cfg, naming) + _vision_rules(cfg, naming)}


def all_rules(cfg: Qwen2_5_VLConfig, naming: HfNaming) -> list[ParamRule]:
    """Every Megatron parameter of the whole model (all stages), including the tied output-layer alias."""
    return list(_rules_by_name(cfg, naming).values())


def checkpoint_rules(cfg: Qwen2_5_VLConfig, naming: HfNaming) -> list[ParamRule]:
    """The tensors stored in a checkpoint (each exactly once)."""
    return [r for r in all_rules(cfg, naming) if r.exported]


def parameter_rule(megatron_name: str, cfg: Qwen2_5_VLConfig, naming: HfNaming) -> ParamRule:
    name = canonical_megatron_name(megatron_name)
    rule = _rules_by_name(cfg, naming).get(name)
    if rule is None:
        raise ValueError(f"no HF conversion rule for Megatron tensor '{megatron_name}' (canonical '{name}')")
    return rule


def megatron_to_hf(
    megatron_name: str, full_tensor: torch.Tensor, cfg: Qwen2_5_VLConfig, naming: HfNaming = TRANSFORMERS5
) -> list[tuple[str, torch.Tensor]]:
    """HF (name, tensor) pairs of one full (TP-merged) Megatron tensor; [] for the tied output-layer alias."""
    rule = parameter_rule(megatron_name, cfg, naming)
    if tuple(full_tensor.shape) != rule.megatron_shape:
        raise ValueError(
            f"Megatron tensor '{megatron_name}' has shape {tuple(full_tensor.shape)}, expected {rule.megatron_shape}"
        )
    if not rule.exported:
        return []
    return list(zip(rule.hf_names, rule.layout.to_parts(full_tensor)))


def hf_to_megatron(
    megatron_name: str, hf_tensors: Sequence[torch.Tensor], cfg: Qwen2_5_VLConfig, naming: HfNaming = TRANSFORMERS5
) -> torch.Tensor:
    """Full Megatron tensor from its HF tensors, given in the order of ``parameter_rule(...).hf_names``."""
    rule = parameter_rule(megatron_name, cfg, naming)
    check_hf_shapes(rule, [tuple(t.shape) for t in hf_tensors])
    return rule.layout.from_parts(list(hf_tensors))


def check_hf_shapes(rule: ParamRule, shapes: Sequence[tuple[int, ...]]) -> None:
    expected = rule.hf_shapes()
    if len(shapes) != len(expected):
        raise ValueError(f"'{rule.megatron_name}' needs {len(expected)} HF tensors {rule.hf_names}, got {len(shapes)}")
    for hf_name, shape, want in zip(rule.hf_names, shapes, expected):
        if tuple(shape) != want:
            raise ValueError(f"HF tensor '{hf_name}' has shape {tuple(shape)}, expected {want}")


def validate_hf_tensors(
    hf_shapes: dict[str, tuple[int, ...]], cfg: Qwen2_5_VLConfig, naming: HfNaming, where: str = "checkpoint"
) -> None:
    """ValueError naming every missing, unexpected or mis-shaped tensor of a HF checkpoint."""
    expected: dict[str, tuple[int, ...]] = {}
    for rule in checkpoint_rules(cfg, naming):
        expected.update(zip(rule.hf_names, rule.hf_shapes()))
    optional = {naming.lm_head} if cfg.text.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(hf_shapes))
    extra = sorted(set(hf_shapes) - set(expected) - optional)
    wrong = sorted(
        f"{n}: {tuple(hf_shapes[n])} (expected {expected[n]})"
        for n in set(expected) & set(hf_shapes)
        if tuple(hf_shapes[n]) != expected[n]
    )
    if optional & set(hf_shapes) and tuple(hf_shapes[naming.lm_head]) != expected[f"{naming.text_prefix}embed_tokens.weight"]:
        wrong.append(f"{naming.lm_head}: {tuple(hf_shapes[naming.lm_head])} (tied to embed_tokens)")
    problems = []
    if missing:
        problems.append(f"missing tensors: {_short_list(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_short_list(extra)}")
    if wrong:
        problems.append(f"mis-shaped tensors: {_short_list(wrong)}")
    if problems:
        raise ValueError(f"{where} does not match the Qwen2.5-VL config: " + "; ".join(problems))


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
