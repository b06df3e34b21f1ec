"""Typed architecture description of a Qwen2.5-VL checkpoint, read from its HF ``config.json``.

Two layouts of ``config.json`` exist in the wild and both are accepted:
* the released Qwen checkpoints (transformers 4.x): text fields at the top level, ``rope_scaling``
  holding ``mrope_section``, ``in_chans`` in the vision config;
* transformers >= 5: text fields under ``text_config`` with ``rope_parameters``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    window_size: int = 112
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6  # fixed in the reference implementation, not in config.json

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_input_size(self) -> int:
        """Number of pixel values in one flattened patch (channels x temporal x patch x patch)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merged_hidden_size(self) -> int:
        """Width of the merger's input: spatial_merge_size**2 neighbouring patches concatenated."""
        return self.hidden_size * self.spatial_merge_size**2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    mrope_section: tuple[int, int, int]
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Qwen2_5_VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Qwen2_5_VLConfig":
        """Inverse of :meth:`to_dict` (the form stored inside our Megatron checkpoints)."""
        text = dict(data["text"])
        text["mrope_section"] = tuple(text["mrope_section"])
        vision = dict(data["vision"])
        vision["fullatt_block_indexes"] = tuple(vision["fullatt_block_indexes"])
        rest = {k: v for k, v in data.items() if k not in ("text", "vision")}
        return cls(text=TextConfig(**text), vision=VisionConfig(**vision), **rest)


def _require(section: dict[str, Any], key: str, where: str) -> Any:
    if key not in section:
        raise ValueError(f"{where}: missing key '{key}'")
    return section[key]


def _check_architecture(hf: dict[str, Any], where: str) -> None:
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type in SUPPORTED_MODEL_TYPES and (
        not architectures or any(a in SUPPORTED_ARCHITECTURES for a in architectures)
    ):
        return
    raise ValueError(
        f"{where}: unknown architecture (model_type={model_type!r}, architectures={architectures!r}); "
        f"supported: model_type in {SUPPORTED_MODEL_TYPES} with architectures {SUPPORTED_ARCHITECTURES}"
    )


def _rope_settings(text: dict[str, Any], hf: dict[str, Any], where: str) -> tuple[tuple[int, int, int], float]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (only default/mrope)")
    section = rope.get("mrope_section")
    if section is None:
        raise ValueError(f"{where}: no mrope_section in rope_parameters/rope_scaling")
    if len(section) != 3:
        raise ValueError(f"{where}: mrope_section must have 3 entries (t, h, w), got {section}")
    theta = rope.get("rope_theta", text.get("rope_theta", hf.get("rope_theta", 1000000.0)))
    return (int(section[0]), int(section[1]), int(section[2])), float(theta)


def parse_hf_config(hf: dict[str, Any], where: str = "config.json") -> Qwen2_5_VLConfig:
    """Builds our typed config from a Qwen2.5-VL HF config dict; ValueError names the missing/bad key."""
    _check_architecture(hf, where)
    text = hf.get("text_config") or hf
    text_where = f"{where} (text_config)" if "text_config" in hf else where
    vision = _require(hf, "vision_config", where)
    vision_where = f"{where} (vision_config)"

    if text.get("use_sliding_window", False):
        raise ValueError(f"{text_where}: use_sliding_window=true is not supported")
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{text_where}: hidden_act {text['hidden_act']!r} is not supported (silu only)")
    if vision.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{vision_where}: hidden_act {vision['hidden_act']!r} is not supported (silu only)")

    mrope_section, rope_theta = _rope_settings(text, hf, text_where)
    num_heads = int(_require(text, "num_attention_heads", text_where))
    hidden_size = int(_require(text, "hidden_size", text_where))
    if sum(mrope_section) * 2 != hidden_size // num_heads:
        raise ValueError(
            f"{text_where}: 2 * sum(mrope_section) = {2 * sum(mrope_section)} must equal the head dim "
            f"{hidden_size // num_heads}"
        )
    tie = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    text_cfg = TextConfig(
        vocab_size=int(_require(text, "vocab_size", text_where)),
        hidden_size=hidden_size,
        num_layers=int(_require(text, "num_hidden_layers", text_where)),
        num_attention_heads=num_heads,
        num_kv_heads=int(text.get("num_key_value_heads") or num_heads),
        intermediate_size=int(_require(text, "intermediate_size", text_where)),
        mrope_section=mrope_section,
        rope_theta=rope_theta,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
        tie_word_embeddings=tie,
    )
    vision_rope = vision.get("rope_parameters") or {}
    vision_cfg = VisionConfig(
        depth=int(_require(vision, "depth", vision_where)),
        hidden_size=int(_require(vision, "hidden_size", vision_where)),
        num_heads=int(_require(vision, "num_heads", vision_where)),
        intermediate_size=int(_require(vision, "intermediate_size", vision_where)),
        out_hidden_size=int(_require(vision, "out_hidden_size", vision_where)),
        fullatt_block_indexes=tuple(int(i) for i in vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
        window_size=int(vision.get("window_size", 112)),
        patch_size=int(vision.get("patch_size", 14)),
        temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
        rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
    )
    if vision_cfg.out_hidden_size != text_cfg.hidden_size:
        raise ValueError(
            f"{vision_where}: out_hidden_size {vision_cfg.out_hidden_size} must equal the text hidden_size "
            f"{text_cfg.hidden_size}"
        )
    if vision_cfg.hidden_size % vision_cfg.num_heads or vision_cfg.head_dim % 4:
        raise ValueError(
            f"{vision_where}: hidden_size {vision_cfg.hidden_size} / num_heads {vision_cfg.num_heads} must give "
            "a head dim divisible by 4 (2D rotary embedding)"
        )
    return Qwen2_5_VLConfig(
        text=text_cfg,
        vision=vision_cfg,
        image_token_id=int(hf.get("image_token_id", 151655)),
        video_token_id=int(hf.get("video_token_id", 151656)),
        vision_start_token_id=int(hf.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(hf.get("vision_end_token_id", 151653)),
    )


def load_hf_config(hf_dir: str | Path) -> Qwen2_5_VLConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path}: not found (expected a HF checkpoint directory)")
    with open(path) as f:
        return parse_hf_config(json.load(f), where=str(path))
