"""Crop tool rules: parsing a grounding call, Mini-o3 crop geometry, resizing for the model."""
from __future__ import annotations

import json
import math
import random
import re

import numpy as np
import pytest
from PIL import Image

from megatron_minio3.rollout.crop_tool import (
    GroundingCall,
    ToolCallError,
    crop_box_pixels,
    crop_observation,
    has_tool_call,
    locate_crop,
    image_grid_thw,
    num_image_tokens,
    parse_grounding,
    resize_for_model,
    resize_for_processor,
    scale_to_pixel_range,
    smart_resize,
)


def _gradient_image(width: int, height: int) -> Image.Image:
    """Each pixel encodes its own (x, y), so a crop shows exactly which pixels it took."""
    xs = np.arange(width, dtype=np.uint32)[None, :].repeat(height, 0)
    ys = np.arange(height, dtype=np.uint32)[:, None].repeat(width, 1)
    pixels = np.stack([xs % 256, ys % 256, (xs // 256) * 16 + ys // 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


# ---------------------------------------------------------------- parse_grounding


def test_parse_canonical_call():
    call = parse_grounding('<think>look</think><grounding>{"bbox_2d": [0.1, 0.2, 0.5, 0.6], "source": "original_image"}</grounding>')
    assert call == GroundingCall(bbox_2d=(0.1, 0.2, 0.5, 0.6), source="original_image")
    assert call.source_index == 0


def test_parse_any_key_order_and_whitespace():
    text = '<grounding>\n  {\n "source" :"observation_3",\n\t"bbox_2d":[ 0 , 0.25,1,\n 0.75 ] }\n</grounding>'
    call = parse_grounding(text)
    assert call.bbox_2d == (0.0, 0.25, 1.0, 0.75)
    assert call.source == "observation_3" and call.source_index == 3


def test_parse_takes_the_last_call_and_ignores_extra_text():
    text = (
        'I will first try <grounding>{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}</grounding> no wait, '
        'better: <grounding>{"bbox_2d": [0.5, 0.5, 0.9, 0.9], "source": "observation_1"}</grounding> trailing text'
    )
    assert parse_grounding(text) == GroundingCall((0.5, 0.5, 0.9, 0.9), "observation_1")


def test_parse_uses_last_opening_tag_before_close():
    text = '<grounding>garbage <grounding>{"bbox_2d": [0, 0, 0.5, 0.5], "source": "original_image"}</grounding>'
    assert parse_grounding(text).bbox_2d == (0.0, 0.0, 0.5, 0.5)


def test_parse_integers_become_floats():
    call = parse_grounding('<grounding>{"bbox_2d": [10, 20, 30, 40], "source": "original_image"}</grounding>')
    assert call.bbox_2d == (10.0, 20.0, 30.0, 40.0)
    assert all(isinstance(v, float) for v in call.bbox_2d)


@pytest.mark.parametrize(
    "payload, message",
    [
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "original_image"', "not valid JSON"),
        ("{'bbox_2d': [0.1, 0.2, 0.3, 0.4], 'source': 'original_image'}", "not valid JSON"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": original_image}', "not valid JSON"),
        ("[0.1, 0.2, 0.3, 0.4]", "must be a JSON object"),
        ("", "empty"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4]}', "missing the key(s) source"),
        ('{"source": "original_image"}', "missing the key(s) bbox_2d"),
        ('{"bbox": [0.1, 0.2, 0.3, 0.4], "source": "original_image"}', "missing the key(s) bbox_2d"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "original_image", "label": "cat"}', "unexpected key(s) label"),
        ('{"bbox_2d": [0.1, 0.2, 0.3], "source": "original_image"}', "four numbers"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4, 0.5], "source": "original_image"}', "four numbers"),
        ('{"bbox_2d": "0.1, 0.2, 0.3, 0.4", "source": "original_image"}', "four numbers"),
        ('{"bbox_2d": [0.1, "0.2", 0.3, 0.4], "source": "original_image"}', "four finite numbers"),
        ('{"bbox_2d": [0.1, true, 0.3, 0.4], "source": "original_image"}', "four finite numbers"),
        ('{"bbox_2d": [0.1, NaN, 0.3, 0.4], "source": "original_image"}', "four finite numbers"),
        ('{"bbox_2d": [0.1, 0.2, Infinity, 0.4], "source": "original_image"}', "four finite numbers"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "image"}', "source must be"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "observation_"}', "source must be"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "observation_-1"}', "source must be"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": "observation_1 "}', "source must be"),
        ('{"bbox_2d": [0.1, 0.2, 0.3, 0.4], "source": 1}', "source must be a string"),
    ],
)
def test_parse_rejects_bad_calls_with_a_message(payload, message):
    with pytest.raises(ToolCallError) as info:
        parse_grounding(f"<think>x</think><grounding>{payload}</grounding>")
    assert message in str(info.value)


def test_parse_needs_tags():
    with pytest.raises(ToolCallError, match="no </grounding>"):
        parse_grounding('{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}')
    with pytest.raises(ToolCallError, match="without an opening"):
        parse_grounding('{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}</grounding>')


def test_parse_never_evaluates_python():
    with pytest.raises(ToolCallError):
        parse_grounding('<grounding>{"bbox_2d": __import__("os").getcwd(), "source": "original_image"}</grounding>')


def test_has_tool_call():
    assert has_tool_call('<grounding>{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}</grounding>')
    assert has_tool_call("broken call</grounding>")  # stopped at the tag: a (malformed) call
    assert not has_tool_call("<think>done</think><answer>B</answer>")
    assert not has_tool_call('<grounding>{"bbox_2d": [0, 0, 1, 1]')  # cut off before the closing tag



# ---------------------------------------------------------------- parsing is total


def _parse_and_locate(text: str, sizes=((100, 80), (37, 5)), model_sizes=((112, 84), (56, 28))):
    """What the agent loop does with a turn, in both coordinate modes: a located box, or a ToolCallError."""
    call = parse_grounding(text)
    for relative in (True, False):
        index, box = locate_crop(list(sizes), call, relative=relative, model_sizes=list(model_sizes))
        width, height = sizes[index]
        left, top, right, bottom = box
        assert all(type(v) is int for v in box)
        assert 0 <= left < right <= width - 1 and 0 <= top < bottom <= height - 1, (text[:200], box)
    return call


def _check_total(text: str) -> None:
    try:
        call = _parse_and_locate(text)
    except ToolCallError as exc:
        message = str(exc)
        # shown to the model: short, and encodable by the tokenizer (no lone surrogates)
        assert len(message) <= 600, (text[:200], len(message))
        message.encode("utf-8")
        return
    assert all(math.isfinite(v) for v in call.bbox_2d)


_HUGE_INT = "9" * 400
_HOSTILE_PAYLOADS = [
    '{"bbox_2d": [0, 0, 1e308, 1], "source": "original_image"}',  # x1 * W overflows to inf
    '{"bbox_2d": [-1e308, -1e308, 1e308, 1e308], "source": "original_image"}',
    '{"bbox_2d": [0, 0, 1.7976931348623157e308, 1], "source": "observation_1"}',
    '{"bbox_2d": [0, 0, 1e309, 1], "source": "original_image"}',  # parses to inf
    f'{{"bbox_2d": [0, 0, {_HUGE_INT}, 1], "source": "original_image"}}',  # int too large for a float
    f'{{"bbox_2d": [0, 0, -{_HUGE_INT}, 1], "source": "original_image"}}',
    f'{{"bbox_2d": [0, 0, {"9" * 5000}, 1], "source": "original_image"}}',  # past int's 4300-digit limit
    f'{{"bbox_2d": [0, 0, 1, 1], "source": "observation_{"9" * 5000}"}}',
    f'{{"bbox_2d": [0, 0, 1, 1], "source": "observation_{"9" * 40}"}}',
    '{"bbox_2d": [0, 0, 1, 1], "source": "observation_\u0663"}',  # a non-ASCII digit
    '{"bbox_2d": [0, 0, 1, 1], "source": "\\ud800"}',  # a lone surrogate
    '{"bbox_2d": [0, 0, 1, 1], "source": "original_image", "\\ud800": 1}',
    '{"bbox_2d": [0, 0, 1, 1], "source": "original_image", "' + "k" * 100_000 + '": 1}',
    '{"bbox_2d": [0, 0, 1, 1], "source": "' + "x" * 1_000_000 + '"}',
    '{"bbox_2d": [0, 0, 1, 1], "bbox_2d": [0, 0, 1, 1], "source": "original_image"}',
    '{"bbox_2d": [' + "[" * 3000 + "]" * 3000 + ', 0, 1, 1], "source": "original_image"}',
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 100_000 + "1" + "}" * 100_000,
    '{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}' * 10_000,
    "NaN", "Infinity", "-Infinity", "null", "true", "1e400", _HUGE_INT, '"' + "\\u0000" * 10 + '"',
]


@pytest.mark.parametrize("payload", _HOSTILE_PAYLOADS, ids=range(len(_HOSTILE_PAYLOADS)))
def test_hostile_calls_give_a_box_or_a_tool_call_error(payload):
    _check_total(f"<think>x</think><grounding>{payload}</grounding>")


def test_huge_numbers_clamp_to_the_image_edge():
    call = parse_grounding('<grounding>{"bbox_2d": [-1e308, 0, 1e308, 0.5], "source": "original_image"}</grounding>')
    assert crop_box_pixels(call.bbox_2d, (100, 80)) == (0, 0, 99, 40)


def test_error_messages_quote_at_most_an_excerpt_of_the_call():
    with pytest.raises(ToolCallError) as info:
        parse_grounding('<grounding>{"bbox_2d": "' + "x" * 4000 + '", "source": "original_image"}</grounding>')
    assert "four numbers" in str(info.value) and len(str(info.value)) < 200
    with pytest.raises(ToolCallError, match="characters long") as info:
        parse_grounding('<grounding>{"bbox_2d": "' + "x" * 100_000 + '", "source": "original_image"}</grounding>')
    assert len(str(info.value)) < 200


def _mutations(rng: random.Random, count: int):
    """Malformed grounding calls: random edits of well-formed ones with hostile pieces spliced in."""
    valid = [
        '{"bbox_2d": [0.1, 0.2, 0.5, 0.6], "source": "original_image"}',
        '{"source": "observation_1", "bbox_2d": [0, 0.25, 1, 0.75]}',
        '{"bbox_2d": [10, 20, 30, 40], "source": "original_image"}',
    ]
    pieces = [
        "1e308", "-1e308", "1e-400", "1e999", _HUGE_INT, "9" * 5000, "NaN", "Infinity", "-0", "0x10", "1_000",
        "true", "null", '"1"', "[]", "{}", "[[[[", "]]]]", "{{", "}}", ",", ":", '"', "\\", "\\u", "\\ud800",
        "\\udfff", "\u0663", "\u00e9", "\U0001f600", "\x00", "\n", " " * 50, "<grounding>", "</grounding>",
        "<|im_end|>", "<|image_pad|>", '"bbox_2d"', '"source"', '"observation_99999999999"', '"observation_0"',
        "[" * 2000, "{" * 2000, '{"a":' * 1500, "x" * 20_000,
    ]
    alphabet = '{}[]":,.-+eE0123456789 \\abnstu'
    for _ in range(count):
        text = rng.choice(valid)
        for _ in range(rng.randint(1, 4)):
            at = rng.randint(0, len(text))
            roll = rng.random()
            if roll < 0.4:
                text = text[:at] + rng.choice(pieces) + text[at:]
            elif roll < 0.6:
                text = text[:at] + text[at + rng.randint(1, 8):]
            elif roll < 0.8:
                text = text[:at] + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) + text[at + 1:]
            else:
                number = rng.choice(["1e308", "-1e308", _HUGE_INT, "-" + _HUGE_INT, "1e-320", "4.9e-324", "0"])
                text = re.sub(r"-?\d+(\.\d+)?", number, text, count=1)
        yield text


_NUMBER_LITERALS = [
    "0", "1", "0.5", "0.25", "0.75", "-0.0", "2", "37", "112", "1e308", "-1e308", "1e309", "1e-400", "4.9e-324",
    "NaN", "Infinity", "-Infinity", _HUGE_INT, "-" + _HUGE_INT, "1" + "0" * 30, "0.99999999999999999999",
]


def _random_value(rng: random.Random, depth: int = 0) -> str:
    """JSON text of a random value (numbers written as literals, so huge and non-finite ones appear)."""
    roll = rng.random()
    if roll < 0.45 or depth > 3:
        return rng.choice(_NUMBER_LITERALS) if rng.random() < 0.8 else rng.choice(["true", "false", "null"])
    if roll < 0.65:
        text = rng.choice(["original_image", "observation_1", "observation_0", "x", "\u0663", "\ud800", "é" * 40])
        return json.dumps(text, ensure_ascii=rng.random() < 0.5) if "\\" not in text else f'"{text}"'
    if roll < 0.9:
        return "[" + ", ".join(_random_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 3, 4, 4, 4, 5]))) + "]"
    return "{" + ", ".join(f'"k{i}": {_random_value(rng, depth + 1)}' for i in range(rng.randint(0, 2))) + "}"


def _random_calls(rng: random.Random, count: int):
    """Well-formed JSON objects with the right keys (mostly) and hostile values."""
    for _ in range(count):
        roll = rng.random()
        if roll < 0.3:  # corners in order, extreme values: a box clamped to the edges, or an error
            low = ["-1e308", "0", "1", "-" + _HUGE_INT, "1e-400"]
            high = ["37", "112", "1e308", _HUGE_INT, "1" + "0" * 30]
            bbox = f"[{rng.choice(low)}, {rng.choice(low)}, {rng.choice(high)}, {rng.choice(high)}]"
        elif roll < 0.6:
            bbox = "[" + ", ".join(rng.choice(_NUMBER_LITERALS) for _ in range(4)) + "]"
        else:
            bbox = _random_value(rng)
        source = rng.choice([
            '"original_image"', '"observation_1"', f'"observation_{rng.randint(0, 10 ** rng.randint(1, 12))}"',
            '"observation_\\u0663"', '"observation_-1"', '"\\ud800"', _random_value(rng),
        ])
        items = [f'"bbox_2d": {bbox}', f'"source": {source}']
        if rng.random() < 0.1:
            items.append(f'"{rng.choice(["label", "bbox_2d", "source", "é"])}": {_random_value(rng)}')
        if rng.random() < 0.1:
            items.pop(rng.randrange(len(items)))
        rng.shuffle(items)
        yield "{" + rng.choice([", ", ",\n  ", ","]).join(items) + "}"


def test_fuzzed_calls_give_a_box_or_a_tool_call_error():
    rng = random.Random(20250915)
    outcomes = {"box": 0, "error": 0}
    for text in list(_mutations(rng, 2000)) + list(_random_calls(rng, 3000)):
        for wrapped in (f"<grounding>{text}</grounding>", f"<think>{text}</think><grounding>{text}</grounding>", text):
            try:
                _parse_and_locate(wrapped)
                outcomes["box"] += 1
            except ToolCallError:
                outcomes["error"] += 1
            _check_total(wrapped)
    assert outcomes["box"] > 100 and outcomes["error"] > 1000, outcomes  # the generator reaches both outcomes


# ---------------------------------------------------------------- crop geometry


def test_relative_box_truncates_to_int():
    # 0.333 * 100 = 33.3 -> 33 ; 0.669 * 50 = 33.45 -> 33
    assert crop_box_pixels((0.333, 0.1, 0.669, 0.669), (100, 50)) == (33, 5, 66, 33)


def test_box_outside_image_is_clamped():
    assert crop_box_pixels((-0.5, -2.0, 1.7, 3.0), (100, 80)) == (0, 0, 99, 79)
    # fully outside on the right: both x clamp to W-1 -> zero width -> error
    with pytest.raises(ToolCallError, match="at least one pixel"):
        crop_box_pixels((1.2, 0.0, 1.5, 1.0), (100, 80))


def test_reversed_corners_are_an_error():
    with pytest.raises(ToolCallError, match="x1 > x0"):
        crop_box_pixels((0.8, 0.1, 0.2, 0.9), (100, 100))
    with pytest.raises(ToolCallError, match="y1 > y0"):
        crop_box_pixels((0.1, 0.9, 0.8, 0.2), (100, 100))


def test_zero_area_and_subpixel_boxes_are_errors():
    with pytest.raises(ToolCallError):
        crop_box_pixels((0.5, 0.5, 0.5, 0.5), (100, 100))
    with pytest.raises(ToolCallError):
        crop_box_pixels((0.10, 0.1, 0.105, 0.5), (100, 100))  # 10.0 -> 10, 10.5 -> 10: zero width


def test_one_pixel_box_is_allowed_no_minimum_size():
    assert crop_box_pixels((0.10, 0.10, 0.11, 0.11), (100, 100)) == (10, 10, 11, 11)


def test_aspect_ratio_limit():
    # 199 x 1 is fine, 200 x 1 is not (the ratio must stay below 200)
    assert crop_box_pixels((0, 0, 199 / 1000, 1 / 1000), (1000, 1000)) == (0, 0, 199, 1)
    with pytest.raises(ToolCallError, match="aspect ratio"):
        crop_box_pixels((0, 0, 200 / 1000, 1 / 1000), (1000, 1000))


def test_absolute_box_scales_from_model_size_to_raw_size():
    # the model saw 56x28, the raw image is 400x200: scale 400/56 and 200/28
    box = crop_box_pixels((14, 7, 42, 21), (400, 200), relative=False, model_size=(56, 28))
    assert box == (int(14 * 400 / 56), int(7 * 200 / 28), int(42 * 400 / 56), int(21 * 200 / 28))
    with pytest.raises(ValueError, match="model-side image size"):
        crop_box_pixels((14, 7, 42, 21), (400, 200), relative=False)


def test_crop_takes_raw_pixels_of_the_chosen_source():
    original = _gradient_image(300, 200)
    call = GroundingCall((0.1, 0.25, 0.5, 0.75), "original_image")
    crop = crop_observation([original], call)
    assert crop.size == (120, 100)  # (30..150) x (50..150): a plain crop, no resize
    assert np.array_equal(np.asarray(crop), np.asarray(original)[50:150, 30:150])


def test_crop_of_an_earlier_observation_uses_its_raw_pixels():
    original = _gradient_image(300, 200)
    first = crop_observation([original], GroundingCall((0.5, 0.5, 1.0, 1.0), "original_image"))
    assert first.size == (149, 99)  # right/bottom clamp to W-1/H-1
    second = crop_observation([original, first], GroundingCall((0.0, 0.0, 0.5, 0.5), "observation_1"))
    assert second.size == (74, 49)
    assert np.array_equal(np.asarray(second), np.asarray(original)[100:149, 150:224])


def test_missing_observation_is_an_error_that_lists_the_sources():
    images = [_gradient_image(64, 64), _gradient_image(32, 32)]
    with pytest.raises(ToolCallError) as info:
        crop_observation(images, GroundingCall((0, 0, 1, 1), "observation_7"))
    assert "observation_7 does not exist" in str(info.value)
    assert "original_image, observation_1" in str(info.value)
    with pytest.raises(ToolCallError):
        crop_observation(images, GroundingCall((0, 0, 1, 1), "observation_2"))


def test_a_call_without_any_image_is_an_error():
    with pytest.raises(ToolCallError, match="no image to zoom into"):
        locate_crop([], GroundingCall((0, 0, 1, 1), "original_image"))


def test_crop_absolute_needs_model_sizes():
    images = [_gradient_image(400, 200)]
    crop = crop_observation(images, GroundingCall((0, 0, 28, 28), "original_image"), relative=False, model_sizes=[(56, 28)])
    assert crop.size == (200, 199)
    with pytest.raises(ValueError, match="one model size per observation"):
        crop_observation(images, GroundingCall((0, 0, 28, 28), "original_image"), relative=False)


# ---------------------------------------------------------------- resizing


def test_smart_resize_matches_known_values():
    assert smart_resize(224, 224, min_pixels=3136, max_pixels=12845056) == (224, 224)
    assert smart_resize(100, 150, min_pixels=3136, max_pixels=12845056) == (112, 140)
    # too large: scale down by sqrt, floor to multiples of 28
    h, w = smart_resize(4000, 3000, min_pixels=3136, max_pixels=1_000_000)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 1_000_000
    assert (h, w) == (math.floor(4000 / math.sqrt(12) / 28) * 28, math.floor(3000 / math.sqrt(12) / 28) * 28)
    # too small: scale up, ceil to multiples of 28
    assert smart_resize(10, 20, min_pixels=3136, max_pixels=12845056) == (56, 84)
    # a side rounding to zero goes through the scale-up branch
    assert smart_resize(13, 2000, min_pixels=3136, max_pixels=12845056) == (28, 700)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500, min_pixels=3136, max_pixels=12845056)


def test_smart_resize_agrees_with_transformers():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    rng = np.random.default_rng(0)
    for _ in range(500):
        height, width = (int(v) for v in rng.integers(1, 5000, size=2))
        if max(height, width) / min(height, width) > 200:
            continue
        for bounds in ((3136, 12845056), (40_000, 2_000_000)):
            ours = smart_resize(height, width, min_pixels=bounds[0], max_pixels=bounds[1])
            assert ours == tuple(hf_smart_resize(height, width, 28, bounds[0], bounds[1])), (height, width, bounds)


def test_scale_to_pixel_range():
    assert scale_to_pixel_range((400, 300), 40_000, 2_000_000) == (400, 300)
    width, height = scale_to_pixel_range((4000, 3000), 40_000, 2_000_000)  # 12M -> 2M
    assert (width, height) == (int(4000 * math.sqrt(2 / 12)), int(3000 * math.sqrt(2 / 12)))
    width, height = scale_to_pixel_range((50, 40), 40_000, 2_000_000)  # 2000 -> 40000
    assert (width, height) == (int(50 * math.sqrt(20)), int(40 * math.sqrt(20)))
    assert scale_to_pixel_range((100, 2), 100, 2_000_000) == (100, 28)  # a side under 28 px becomes 28


def test_resize_for_model_nearest_keeps_pixel_values():
    crop = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8), "RGB")  # 2x1
    resized = resize_for_model(crop, 40_000, 2_000_000, Image.Resampling.NEAREST)
    assert resized.size == scale_to_pixel_range((2, 1), 40_000, 2_000_000)
    colours = {tuple(c) for c in np.asarray(resized).reshape(-1, 3)}
    assert colours == {(255, 0, 0), (0, 0, 255)}  # nearest neighbour: no blended colours


def test_resize_for_model_converts_to_rgb_and_downscales_huge_images():
    huge = Image.new("L", (6000, 4000), color=128)
    resized = resize_for_model(huge, 40_000, 2_000_000, Image.Resampling.BICUBIC)
    assert resized.mode == "RGB" and resized.width * resized.height <= 2_000_000
    with pytest.raises(ValueError, match="min_pixels"):
        resize_for_model(huge, 100, 10, Image.Resampling.BICUBIC)


def test_resize_for_processor_gives_a_fixed_point_of_smart_resize():
    image = resize_for_model(_gradient_image(333, 171), 40_000, 2_000_000, Image.Resampling.NEAREST)
    final = resize_for_processor(image, 3136, 12845056)
    assert final.width % 28 == 0 and final.height % 28 == 0
    assert smart_resize(final.height, final.width, min_pixels=3136, max_pixels=12845056) == (final.height, final.width)
    assert resize_for_processor(final, 3136, 12845056) is final


def test_grid_and_token_count():
    assert image_grid_thw((56, 84)) == (1, 6, 4)
    assert num_image_tokens((1, 6, 4)) == 6
    assert num_image_tokens(image_grid_thw((448, 336))) == 16 * 12
