"""The Mini-o3 crop tool as pure functions: parse a grounding call, crop the raw source, resize for the model.

Geometry (recipe, relative coordinates): the box values are fractions of the full-resolution raw source
(the original image or an earlier raw crop). Pixel box = (x0*W, y0*H, x1*W, y1*H), each truncated to int,
clamped to [0, W-1] x [0, H-1]; the box must then be at least 1 px wide and high and its aspect ratio must
stay under 200. The crop is a plain crop of the raw source; only the copy shown to the model is resized.

Errors the model made raise `ToolCallError`; its message is written to be shown to the model.
Parsing is total: whatever text a model writes, `parse_grounding` and `locate_crop` return a call and a box
inside the source, or raise `ToolCallError` (never OverflowError, RecursionError or another exception), and
an error message quotes at most a short, ASCII-escaped excerpt of what the model wrote.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

OPEN_TAG = "<grounding>"
CLOSE_TAG = "</grounding>"
ORIGINAL_SOURCE = "original_image"
MAX_ASPECT_RATIO = 200.0
# Qwen2.5-VL: 14 px patches merged 2x2, so image sides are multiples of 28 and a side is at least 28 px.
IMAGE_FACTOR = 28

# ASCII digits only (\d would take any Unicode digit); at most 9 so that the index is always a small int.
_OBSERVATION_RE = re.compile(r"observation_([0-9]{1,9})")
# A well-formed call is under 100 characters; a longer payload is refused before JSON parsing, which bounds
# the work and the nesting depth (deep nesting is also caught: RecursionError).
MAX_CALL_CHARS = 4096
_EXCERPT_CHARS = 80
_BBOX_KEY = "bbox_2d"
_SOURCE_KEY = "source"


class ToolCallError(ValueError):
    """A tool call the model got wrong. The message is meant to be shown to the model in an error turn."""


def _excerpt(value: object) -> str:
    """A short JSON-ish rendering of something the model wrote, safe to quote in an error turn: ASCII only
    (a lone surrogate cannot reach the tokenizer), at most about _EXCERPT_CHARS characters."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (ValueError, TypeError, RecursionError, OverflowError):  # e.g. an int beyond str()'s digit limit
        text = f"<{type(value).__name__}>"
    if len(text) > _EXCERPT_CHARS:
        text = text[: _EXCERPT_CHARS - 3] + "..."
    return text


def _key_name(key: str) -> str:
    """A key as quoted in an error turn: plain when it is a short ASCII word, otherwise an excerpt."""
    return key if re.fullmatch(r"[A-Za-z0-9_]{1,40}", key) else _excerpt(key)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    value: dict[str, object] = {}
    for key, item in pairs:
        if key in value:
            raise ToolCallError(f"the key {_key_name(key)} appears twice in the grounding call")
        value[key] = item
    return value


@dataclass(frozen=True)
class GroundingCall:
    """One zoom request: a box (x0, y0, x1, y1) in the source's coordinates and the source's name."""

    bbox_2d: tuple[float, float, float, float]
    source: str

    @property
    def source_index(self) -> int:
        """Index into the observation list: `original_image` is 0, `observation_i` is i."""
        if self.source == ORIGINAL_SOURCE:
            return 0
        match = _OBSERVATION_RE.fullmatch(self.source)
        assert match is not None, f"GroundingCall built with an unchecked source {self.source!r}"
        return int(match.group(1))


def has_tool_call(text: str) -> bool:
    """True when the turn asks for the tool, i.e. it contains the closing tag generation stops at.

    A turn that closes a grounding tag without a well-formed call is still a tool call: parsing it
    then fails with a ToolCallError that becomes an error turn.
    """
    return CLOSE_TAG in text


def parse_grounding(text: str) -> GroundingCall:
    """Parse the last `<grounding>{...}</grounding>` of a turn.

    The payload must be a JSON object with exactly the keys `bbox_2d` (four finite numbers) and
    `source` (`original_image` or `observation_<i>`), in any order and with any whitespace.
    """
    close_at = text.rfind(CLOSE_TAG)
    if close_at < 0:
        raise ToolCallError(f"no {CLOSE_TAG} tag found; write the call as {OPEN_TAG}{{...}}{CLOSE_TAG}")
    open_at = text.rfind(OPEN_TAG, 0, close_at)
    if open_at < 0:
        raise ToolCallError(f"{CLOSE_TAG} without an opening {OPEN_TAG} tag")
    payload = text[open_at + len(OPEN_TAG) : close_at].strip()
    if not payload:
        raise ToolCallError("the grounding call is empty; expected a JSON object with bbox_2d and source")
    if len(payload) > MAX_CALL_CHARS:
        raise ToolCallError(
            f"the grounding call is {len(payload)} characters long; write one short JSON object "
            f"(at most {MAX_CALL_CHARS} characters) with bbox_2d and source"
        )
    try:
        value = json.loads(payload, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ToolCallError(f"the grounding call is not valid JSON ({exc.msg} at position {exc.pos})") from None
    except RecursionError:
        raise ToolCallError("the grounding call is nested too deeply; expected a flat JSON object") from None
    except ValueError as exc:  # ToolCallError from _unique_keys, or an integer literal past the digit limit
        if isinstance(exc, ToolCallError):
            raise
        raise ToolCallError("the grounding call contains a number too long to read") from None
    if not isinstance(value, dict):
        raise ToolCallError(f"the grounding call must be a JSON object, got {_json_type(value)}")
    missing = [key for key in (_BBOX_KEY, _SOURCE_KEY) if key not in value]
    if missing:
        raise ToolCallError(f"the grounding call is missing the key(s) {', '.join(missing)}")
    extra = sorted(set(value) - {_BBOX_KEY, _SOURCE_KEY})
    if extra:
        shown = ", ".join(_key_name(key) for key in extra[:3]) + (", ..." if len(extra) > 3 else "")
        raise ToolCallError(f"unexpected key(s) {shown}; only bbox_2d and source are allowed")
    return GroundingCall(bbox_2d=_check_bbox(value[_BBOX_KEY]), source=_check_source(value[_SOURCE_KEY]))


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_bbox(bbox: object) -> tuple[float, float, float, float]:
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ToolCallError(f"bbox_2d must be a list of four numbers [x0, y0, x1, y1], got {_excerpt(bbox)}")
    numbers = []
    for item in bbox:
        # bool is an int subclass in Python; true/false are not coordinates.
        number = None
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            try:
                number = float(item)  # an int too large for a float raises OverflowError
            except OverflowError:
                number = None
        if number is None or not math.isfinite(number):
            raise ToolCallError(f"bbox_2d must contain four finite numbers, got {_excerpt(bbox)}")
        numbers.append(number)
    return numbers[0], numbers[1], numbers[2], numbers[3]


def _check_source(source: object) -> str:
    if not isinstance(source, str):
        raise ToolCallError(f"source must be a string, got {_excerpt(source)}")
    if source != ORIGINAL_SOURCE and _OBSERVATION_RE.fullmatch(source) is None:
        raise ToolCallError(f"source must be 'original_image' or 'observation_<i>', got {_excerpt(source)}")
    return source


def crop_box_pixels(
    bbox: tuple[float, float, float, float],
    source_size: tuple[int, int],
    *,
    relative: bool = True,
    model_size: tuple[int, int] | None = None,
) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) in the raw source of size (W, H), right/bottom exclusive.

    relative=True: bbox values are fractions of the raw source. relative=False: bbox values are pixels of
    the resized copy the model saw (`model_size` = its (w, h)) and are scaled to the raw size first.
    """
    width, height = source_size
    x0, y0, x1, y1 = bbox
    if relative:
        scale_x, scale_y = float(width), float(height)
    else:
        if model_size is None:
            raise ValueError("crop_box_pixels: absolute coordinates need the model-side image size")
        scale_x, scale_y = width / model_size[0], height / model_size[1]
    left = _clamp(x0 * scale_x, width - 1)
    top = _clamp(y0 * scale_y, height - 1)
    right = _clamp(x1 * scale_x, width - 1)
    bottom = _clamp(y1 * scale_y, height - 1)
    box_width, box_height = right - left, bottom - top
    if box_width < 1 or box_height < 1:
        raise ToolCallError(
            f"the box {list(bbox)} covers {box_width}x{box_height} px of a {width}x{height} image after "
            "clamping; it needs x1 > x0 and y1 > y0 and must cover at least one pixel in each direction"
        )
    ratio = max(box_width, box_height) / min(box_width, box_height)
    if ratio >= MAX_ASPECT_RATIO:
        raise ToolCallError(
            f"the box {list(bbox)} is {box_width}x{box_height} px; its aspect ratio {ratio:.0f} must be "
            f"below {MAX_ASPECT_RATIO:.0f}"
        )
    return left, top, right, bottom


def _clamp(value: float, upper: int) -> int:
    """int(value) clamped to [0, upper]. Clamping before the truncation gives the same result for every finite
    value and keeps a product that overflowed to +-inf (1e308 * W) from reaching int()."""
    if math.isnan(value):
        raise ToolCallError("a box coordinate is not a number")
    return int(min(max(value, 0.0), float(upper)))


def locate_crop(
    source_sizes: Sequence[tuple[int, int]],
    call: GroundingCall,
    *,
    relative: bool = True,
    model_sizes: Sequence[tuple[int, int]] | None = None,
) -> tuple[int, tuple[int, int, int, int]]:
    """(source index, pixel box) of `call` among observations of raw sizes `source_sizes` (index 0 is the
    original image). `model_sizes[i]`, the (w, h) the model saw of observation i, is needed only for
    absolute coordinates."""
    index = call.source_index
    if not source_sizes:
        raise ToolCallError("this question has no image to zoom into; answer without the tool")
    if index >= len(source_sizes):
        available = ", ".join(["original_image"] + [f"observation_{i}" for i in range(1, len(source_sizes))])
        raise ToolCallError(f"{call.source} does not exist; the available sources are {available}")
    model_size = None
    if not relative:
        if model_sizes is None or len(model_sizes) != len(source_sizes):
            raise ValueError("crop_observation: absolute coordinates need one model size per observation")
        model_size = model_sizes[index]
    return index, crop_box_pixels(call.bbox_2d, source_sizes[index], relative=relative, model_size=model_size)


def crop_observation(
    observations: Sequence[Image.Image],
    call: GroundingCall,
    *,
    relative: bool = True,
    model_sizes: Sequence[tuple[int, int]] | None = None,
) -> Image.Image:
    """The raw crop asked for by `call`: observations[0] is the original image, observations[i] the i-th crop."""
    index, box = locate_crop(
        [image.size for image in observations], call, relative=relative, model_sizes=model_sizes
    )
    return observations[index].crop(box)


def smart_resize(
    height: int, width: int, *, factor: int = IMAGE_FACTOR, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen2-VL's target (height, width): multiples of `factor`, pixel count within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible. Raises ValueError for an aspect ratio above 200.
    """
    if height < 1 or width < 1:
        raise ValueError(f"smart_resize: image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"smart_resize: aspect ratio of {width}x{height} is above {MAX_ASPECT_RATIO:.0f}")
    target_h = round(height / factor) * factor
    target_w = round(width / factor) * factor
    if target_h * target_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        target_h = max(factor, math.floor(height / shrink / factor) * factor)
        target_w = max(factor, math.floor(width / shrink / factor) * factor)
    elif target_h * target_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        target_h = math.ceil(height * grow / factor) * factor
        target_w = math.ceil(width * grow / factor) * factor
    return target_h, target_w


def scale_to_pixel_range(size: tuple[int, int], min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Mini-o3's resize rule on a (w, h) size: scale by sqrt(ratio) down to max_pixels or up to min_pixels
    (sides truncated to int, never below 1), then lift any side under 28 px to 28."""
    width, height = size
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = max(1, int(width * factor)), max(1, int(height * factor))
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    return max(width, IMAGE_FACTOR), max(height, IMAGE_FACTOR)


def resize_for_model(
    image: Image.Image, min_pixels: int, max_pixels: int, resample: Image.Resampling
) -> Image.Image:
    """Mini-o3's resize of an image before the processor: an RGB copy scaled into [min_pixels, max_pixels]
    with `resample` (nearest-neighbour for crops in the recipe), no side under 28 px."""
    if min_pixels < 1 or max_pixels < min_pixels:
        raise ValueError(
            f"resize_for_model: need 1 <= min_pixels <= max_pixels, got min_pixels={min_pixels}, "
            f"max_pixels={max_pixels}"
        )
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    target = scale_to_pixel_range(rgb.size, min_pixels, max_pixels)
    if target == rgb.size:
        return rgb.copy()
    return rgb.resize(target, resample=resample)


def resize_for_processor(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """The Qwen2.5-VL processor's own resize (smart_resize, bicubic) with the processor's pixel bounds.

    Done before the request is sent, so the engine's processor keeps the image as it is and the number of
    image tokens is known on our side. Raises ValueError for an aspect ratio above 200.
    """
    height, width = smart_resize(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)


def model_side_size(
    size: tuple[int, int], min_pixels: int, max_pixels: int, processor_min_pixels: int, processor_max_pixels: int
) -> tuple[int, int]:
    """The (w, h) an image of raw size `size` has once resize_for_model and then resize_for_processor ran
    (without decoding it): what the model sees, hence its patch grid and token count."""
    width, height = scale_to_pixel_range(size, min_pixels, max_pixels)
    target_h, target_w = smart_resize(height, width, min_pixels=processor_min_pixels, max_pixels=processor_max_pixels)
    return target_w, target_h


def image_grid_thw(size: tuple[int, int], patch_size: int = 14) -> tuple[int, int, int]:
    """Qwen2.5-VL (t, h, w) patch grid of a model-side image of size (w, h); one frame for a still image."""
    width, height = size
    assert width % (2 * patch_size) == 0 and height % (2 * patch_size) == 0, f"not a model-side size: {size}"
    return 1, height // patch_size, width // patch_size


def num_image_tokens(grid_thw: tuple[int, int, int], merge_size: int = 2) -> int:
    """Number of `<|image_pad|>` tokens of an image: its patches after the merge_size x merge_size merge."""
    t, h, w = grid_thw
    return t * h * w // (merge_size * merge_size)
