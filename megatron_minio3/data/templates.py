"""Prompt, observation and error texts from the templates in DataConfig (pure string functions).

Image markers `<image>` become Qwen2.5-VL's `<|vision_start|><|image_pad|><|vision_end|>` (one pad token;
the rollout expands it to the image's token count).
"""
from __future__ import annotations

from megatron_minio3.config.data import DataConfig
from megatron_minio3.data.minio3_json import IMAGE_MARKER
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _format(template: str, key: str, **values: object) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        allowed = ", ".join("{" + name + "}" for name in values) or "none"
        raise ValueError(
            f"data.{key}: cannot fill the template ({type(exc).__name__}: {exc}); allowed fields: {allowed}, "
            "write literal braces as {{ }}"
        ) from None


def validate_templates(cfg: DataConfig) -> None:
    """Fill every template once with sample values, so mistakes show before any rollout starts."""
    render_user_text(cfg, "<image>\nquestion", num_images=1)
    observation = render_observation_text(cfg, action=0, observation=1)
    if observation.count(VISION_PLACEHOLDER) != 1:
        raise ValueError(f"data.observation_template: must contain {IMAGE_MARKER} exactly once")
    if any(IMAGE_MARKER in part or VISION_PLACEHOLDER in part for part in render_error_parts(cfg)):
        raise ValueError(f"data.error_template: an error turn carries no image, remove {IMAGE_MARKER}")


def user_message(cfg: DataConfig, question: str, num_images: int) -> str:
    """The first user message with `<image>` markers: the template around the question (a question without
    markers gets one per image in front)."""
    num_markers = question.count(IMAGE_MARKER)
    if num_markers == 0 and num_images > 0:
        question = IMAGE_MARKER * num_images + "\n" + question
    elif num_markers != num_images:
        raise ValueError(f"the question has {num_markers} {IMAGE_MARKER} markers but {num_images} images")
    text = _format(cfg.user_template, "user_template", question=question)
    if text.count(IMAGE_MARKER) != num_images:
        raise ValueError(f"data.user_template: must not add {IMAGE_MARKER} markers of its own")
    return text


def render_user_text(cfg: DataConfig, question: str, num_images: int) -> str:
    """user_message with its markers turned into vision placeholders (what the tokenizer sees)."""
    return user_message(cfg, question, num_images).replace(IMAGE_MARKER, VISION_PLACEHOLDER)


def observation_message(cfg: DataConfig, action: int, observation: int) -> str:
    """A tool-result user turn with its `<image>` marker (without the turn prefix/suffix): `observation` is
    the new image's index."""
    return _format(cfg.observation_template, "observation_template", action=action, observation=observation)


def render_observation_text(cfg: DataConfig, action: int, observation: int) -> str:
    """observation_message with its marker turned into a vision placeholder."""
    return observation_message(cfg, action, observation).replace(IMAGE_MARKER, VISION_PLACEHOLDER)


def render_error_parts(cfg: DataConfig) -> list[str]:
    """The error turn's text (without the turn prefix/suffix) split where the error message goes.

    The message is kept apart because it may quote what the model wrote: it must be tokenized as plain
    text, never as special tokens or image markers.
    """
    sentinel = "\x00error\x00"
    return _format(cfg.error_template, "error_template", error=sentinel).split(sentinel)
