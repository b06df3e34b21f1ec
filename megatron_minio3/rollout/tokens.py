"""Token-level pieces of a trajectory: the first prompt, observation and error turns, image pad runs.

The engine receives prompts with ONE `<|image_pad|>` per image and expands each to the image's token
count itself; the trainer-side record holds the expanded ids. Both are built here from the same pieces,
so the record never goes through a decode/re-encode round trip.
"""
from __future__ import annotations

import copy
import logging
import threading

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from megatron_minio3.config.data import DataConfig
from megatron_minio3.data.templates import (
    render_error_parts,
    render_observation_text,
    render_user_text,
    validate_templates,
)

logger = logging.getLogger(__name__)

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
IM_END = "<|im_end|>"
VIDEO_PAD = "<|video_pad|>"


@dataclass(frozen=True)
class VisionSpec:
    """What the rollout must know of the model's image processor to predict its image token counts."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280


def load_vision_spec(model_path: str | Path) -> VisionSpec:
    """Read patch/merge size and pixel bounds from a checkpoint's image processor config."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(model_path))
    size = getattr(processor, "size", None) or {}
    min_pixels = size.get("shortest_edge") or getattr(processor, "min_pixels", None)
    max_pixels = size.get("longest_edge") or getattr(processor, "max_pixels", None)
    if min_pixels is None or max_pixels is None:
        raise ValueError(f"{model_path}: the image processor config gives no min/max pixels")
    return VisionSpec(
        patch_size=int(processor.patch_size),
        merge_size=int(processor.merge_size),
        min_pixels=int(min_pixels),
        max_pixels=int(max_pixels),
    )


def expand_image_pads(compact_ids: Sequence[int], num_tokens_per_image: Sequence[int], pad_id: int) -> list[int]:
    """Replace the i-th single pad token by num_tokens_per_image[i] pad tokens."""
    expanded: list[int] = []
    image_index = 0
    for token in compact_ids:
        if token == pad_id:
            if image_index >= len(num_tokens_per_image):
                raise ValueError(f"more image pad tokens than images ({len(num_tokens_per_image)})")
            expanded.extend([pad_id] * num_tokens_per_image[image_index])
            image_index += 1
        else:
            expanded.append(token)
    if image_index != len(num_tokens_per_image):
        raise ValueError(f"{image_index} image pad tokens for {len(num_tokens_per_image)} images")
    return expanded


def image_pad_runs(token_ids: Sequence[int], pad_id: int) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of pad tokens, in order."""
    runs: list[tuple[int, int]] = []
    start = -1
    for index, token in enumerate(token_ids):
        if token == pad_id:
            if start < 0:
                start = index
        elif start >= 0:
            runs.append((start, index - start))
            start = -1
    if start >= 0:
        runs.append((start, len(token_ids) - start))
    return runs


def _private_copy(tokenizer: Any) -> Any:
    """A copy of `tokenizer` that nobody else uses (see TurnTokenizer); the tokenizer itself when it cannot be copied
    (then other users of it must not encode with split_special_tokens concurrently)."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception as exc:  # noqa: BLE001 - a tokenizer class that cannot be copied: share it
        logger.warning("cannot copy the tokenizer (%s: %s); the turn tokenizer shares it", type(exc).__name__, exc)
        return tokenizer


class TurnTokenizer:
    """Encodes the first prompt and the tool-result turns from the templates in DataConfig.

    Thread-safe, also against other users of the same tokenizer: an HF fast tokenizer keeps
    `split_special_tokens` as a setting of its shared Rust tokenizer, flipped for the duration of a call, so a
    concurrent plain `encode` elsewhere could split `<|image_pad|>` into text (seen: 179 of 20,000 calls between two
    of our threads; and a scripted engine quoting text while the loop's tool threads encode observation turns).
    So the turn tokenizer encodes with a private copy of the tokenizer, one call at a time (a lock)."""

    def __init__(self, tokenizer: Any, data_cfg: DataConfig):
        validate_templates(data_cfg)
        self._lock = threading.RLock()
        self.tokenizer = tokenizer  # the caller's; encoding uses the private copy
        self._private = _private_copy(tokenizer)
        self.data_cfg = data_cfg
        self.image_pad_id = self._special_id(IMAGE_PAD)
        self.vision_start_id = self._special_id(VISION_START)
        self.im_end_id = self._special_id(IM_END)
        # Placeholder ids the model must never generate (they would be taken for images).
        self.placeholder_ids = (self.image_pad_id, self._special_id(VIDEO_PAD))
        self._turn_prefix = self.encode(data_cfg.turn_prefix)
        self._turn_suffix = self.encode(data_cfg.turn_suffix)
        self._error_parts = [self.encode(part) for part in render_error_parts(data_cfg)]

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == getattr(self.tokenizer, "unk_token_id", None):
            raise ValueError(f"the tokenizer has no {token} token; is this a Qwen2.5-VL checkpoint?")
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        """Template text: special-token strings in it become special tokens."""
        with self._lock:
            return list(self._private.encode(text, add_special_tokens=False))

    def encode_plain(self, text: str) -> list[int]:
        """Untrusted text (e.g. quoting the model): special-token strings stay plain text."""
        with self._lock:
            return list(self._private.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._lock:
            return self._private.decode(list(token_ids), skip_special_tokens=True)

    def prompt_ids(self, question: str, num_images: int) -> list[int]:
        """The first prompt (chat template, generation prompt included) with one pad token per image."""
        ids = self.chat_prompt_ids(self.data_cfg.system_prompt or None,
                                   render_user_text(self.data_cfg, question, num_images))
        assert ids.count(self.image_pad_id) == num_images, "chat template changed the number of image markers"
        return ids

    def chat_prompt_ids(self, system: str | None, user_text: str) -> list[int]:
        """The checkpoint's chat template over an optional system message and one user message (vision
        placeholders already in place), with the generation prompt."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user_text})
        with self._lock:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text)

    def observation_ids(self, action: int, observation: int) -> list[int]:
        """A tool-result turn with one pad token for the new image, between the turn prefix and suffix."""
        return self.user_turn_ids(render_observation_text(self.data_cfg, action=action, observation=observation))

    def user_turn_ids(self, text: str) -> list[int]:
        """A later user turn (vision placeholders in place) between the turn prefix and suffix."""
        return self._turn_prefix + self.encode(text) + self._turn_suffix

    def error_ids(self, error: str) -> list[int]:
        """An error turn; the message is tokenized as plain text."""
        body: list[int] = list(self._error_parts[0])
        for part in self._error_parts[1:]:
            body += self.encode_plain(error) + part
        return self._turn_prefix + body + self._turn_suffix
