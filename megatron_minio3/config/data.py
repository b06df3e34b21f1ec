"""Dataset, image and prompt-template configuration (owned by the data package).

The root config refers to this section as `data: DataConfig`. Templates are configuration so that a
user can match the exact wording a checkpoint was trained with. In every template `<image>` marks where
an image goes (it becomes `<|vision_start|><|image_pad|><|vision_end|>`). The functions that fill the templates
live here too, so that the section checks itself without importing the rest of the package.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_minio3.config.files import read_text_files

IMAGE_MARKER = "<image>"  # where an image goes, in data files and templates
RESAMPLE_NAMES = ("nearest", "bilinear", "bicubic", "lanczos")  # data.image_resample / crop_resample (PIL filters)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
TEMPLATE_KEYS = ("system_prompt", "user_template", "observation_template", "error_template", "turn_prefix",
                 "turn_suffix")

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
    # Any of the templates above from a file instead ({user_template: prompts/user.txt}; paths relative to the
    # working directory): load_config reads each file (its text exactly, less one final newline) into the
    # template and empties this map, so the loaded config, and every checkpoint's config.yaml, holds the text.
    template_files: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.min_pixels < 1:
            raise ValueError(f"data.min_pixels must be at least 1, got {self.min_pixels}")
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"data.max_pixels ({self.max_pixels}) must be at least data.min_pixels ({self.min_pixels})")
        for key in ("image_resample", "crop_resample"):
            if getattr(self, key) not in RESAMPLE_NAMES:
                raise ValueError(f"data.{key}: unknown resample filter {getattr(self, key)!r}; choose one of "
                                 f"{sorted(RESAMPLE_NAMES)}")
        if self.template_files:
            raise ValueError("data.template_files: not read (load_config reads them; call read_template_files)")
        validate_templates(self)


def read_template_files(cfg: DataConfig) -> None:
    """Replace each template named in cfg.template_files by its file's text (less one final newline, which
    editors add); ValueError naming the key and the file at fault."""
    for key, text in read_text_files(cfg.template_files, TEMPLATE_KEYS, "data.template_files", "template").items():
        setattr(cfg, key, text)
    cfg.template_files = {}


# The templates filled in (pure string functions; data/templates.py is their public home).
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
