"""Prompt, observation and error texts from the templates in DataConfig (pure string functions).

Image markers `<image>` become Qwen2.5-VL's `<|vision_start|><|image_pad|><|vision_end|>` (one pad token;
the rollout expands it to the image's token count). The functions are defined with DataConfig
(config/data.py), which checks its templates by filling them; this is where the package imports them from.
"""
from megatron_minio3.config.data import (  # noqa: F401
    IMAGE_MARKER,
    VISION_PLACEHOLDER,
    observation_message,
    render_error_parts,
    render_observation_text,
    render_user_text,
    user_message,
    validate_templates,
)
