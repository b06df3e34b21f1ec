"""Dataset, image and prompt-template configuration (owned by the data package).

The root config refers to this section as `data: DataConfig`. Templates are configuration so that a
user can match the exact wording a checkpoint was trained with. In every template `<image>` marks where
an image goes (it becomes `<|vision_start|><|image_pad|><|vision_end|>`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

DEFAULT_USER_TEMPLATE = (
    "{question}\n\n"
    "Think step by step inside <think> </think>. To look closer at a region, zoom in by writing "
    '<grounding>{{"bbox_2d": [x0, y0, x1, y1], "source": "original_image"}}</grounding> with the box in '
    "relative coordinates between 0 and 1; the zoomed image will be shown to you as a new observation, "
    'and you can zoom again into the original image or into any observation ("observation_1", ...). '
    "When you are sure, give the final answer inside <answer> </answer>."
)

# The wording (including "the the") of the released Mini-o3 checkpoints' observation turn.
DEFAULT_OBSERVATION_TEMPLATE = (
    "After the above Action {action}, here is the the zoom-in image (Observation {observation}):\n<image>.\n"
    "Continue your reasoning inside <think> </think>. If needed, zoom in again into the original image or "
    "any observation with <grounding> </grounding>; otherwise give the final answer inside <answer> </answer>."
)

DEFAULT_ERROR_TEMPLATE = (
    "ERROR occurs during grounding. Error Information: {error}.\n"
    "Analyse the error, then continue your reasoning inside <think> </think>, either with a corrected "
    "<grounding> </grounding> call or with the final answer inside <answer> </answer>."
)


@dataclass
class DataConfig:
    # Mini-o3 JSON files: a list of {"images", "doc_id", "problem", "solution", "data_source"} rows.
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    # Image paths in the files are relative to this directory ("" = relative to each JSON file's folder).
    image_dir: str = ""
    # Mini-o3 resize of every image before the processor (recipe: 40,000 .. 2,000,000 pixels).
    min_pixels: int = 40_000
    max_pixels: int = 2_000_000
    image_resample: str = "bicubic"  # prompt images
    crop_resample: str = "nearest"  # crops (recipe: nearest-neighbour)
    # Chat framing: the first prompt uses the checkpoint's chat template with these messages.
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    user_template: str = DEFAULT_USER_TEMPLATE  # {question} = the row's problem, `<image>` markers included
    # Tool-result turns, appended as tokens between `turn_prefix` and `turn_suffix`.
    observation_template: str = DEFAULT_OBSERVATION_TEMPLATE  # {action}, {observation}
    error_template: str = DEFAULT_ERROR_TEMPLATE  # {error}
    turn_prefix: str = "<|im_end|>\n<|im_start|>user\n"
    turn_suffix: str = "<|im_end|>\n<|im_start|>assistant\n"

    def validate(self) -> None:
        """Called by the config loader; the checks live with the rollout package (imported only here)."""
        from megatron_minio3.rollout.settings import validate_data_config

        validate_data_config(self)
