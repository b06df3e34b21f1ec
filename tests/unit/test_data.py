"""Mini-o3 JSON reader, image loading, templates, the synthetic task generator and data config checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from megatron_minio3.config.data import DataConfig
from megatron_minio3.config.loader import ConfigError, load_config
from megatron_minio3.data.images import ImageLoadError, load_image, resample_from_name
from megatron_minio3.data.minio3_json import dataset_names, read_datasets, read_minio3_json
from megatron_minio3.data.synthetic import write_visual_search_dataset
from megatron_minio3.data.templates import (
    VISION_PLACEHOLDER,
    render_error_parts,
    render_observation_text,
    render_user_text,
    validate_templates,
)

ROW = {"images": ["a.png"], "doc_id": "q1", "problem": "<image>\nWhat?", "solution": "B", "data_source": "vstar"}


def write_json(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def test_reader_resolves_images_against_the_base_dir(tmp_path):
    path = write_json(tmp_path / "bench.json", [ROW, {**ROW, "doc_id": 7, "solution": 42, "verifier": "exact"}])
    prompts = read_minio3_json(path, image_dir="/data/images")
    assert [p.uid for p in prompts] == ["bench/q1", "bench/7"]
    assert prompts[0].image_paths == ("/data/images/a.png",)
    assert prompts[0].question == "<image>\nWhat?" and prompts[0].answer == "B" and prompts[0].data_source == "vstar"
    assert prompts[1].answer == "42" and prompts[1].verifier == "exact"
    # no base dir: relative to the JSON file's folder
    assert read_minio3_json(path)[0].image_paths == (str(tmp_path / "a.png"),)


@pytest.mark.parametrize(
    "rows, message",
    [
        ({"not": "a list"}, "expected a JSON list"),
        (["row"], "row 0: expected an object"),
        ([{k: v for k, v in ROW.items() if k != "problem"}], "row 0: missing key 'problem'"),
        ([{k: v for k, v in ROW.items() if k != "solution"}], "missing key 'solution'"),
        ([{k: v for k, v in ROW.items() if k != "data_source"}], "missing key 'data_source'"),
        ([{**ROW, "images": "a.png"}], "'images' must be a list"),
        ([{**ROW, "problem": 3}], "'problem' must be a string"),
        ([{**ROW, "problem": "<image><image> two?"}], "2 <image> markers but the row has 1 images"),
        ([ROW, ROW], "row 1: doc_id 'q1' appears twice"),
        ([{**ROW, "verifier": 1}], "'verifier' must be a string"),
    ],
)
def test_reader_errors_name_file_row_and_key(tmp_path, rows, message):
    path = write_json(tmp_path / "bad.json", rows)
    with pytest.raises(ValueError) as info:
        read_minio3_json(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_reader_file_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset file not found"):
        read_minio3_json(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_minio3_json(tmp_path / "broken.json")


def test_read_datasets_limits_and_rejects_duplicate_uids(tmp_path):
    rows = [{**ROW, "doc_id": str(i)} for i in range(5)]
    first = write_json(tmp_path / "bench.json", rows)
    second = write_json(tmp_path / "other.json", rows)
    prompts = read_datasets([str(first), str(second)], max_prompts_per_file=2)
    assert [p.uid for p in prompts] == ["bench/0", "bench/1", "other/0", "other/1"]  # stems when they differ
    with pytest.raises(ValueError, match="also appears in an earlier file"):
        read_datasets([str(first), str(first)])


def test_files_of_the_same_name_in_different_folders_keep_their_ids_apart(tmp_path):
    """The seed's VisualProbe_train/train.json and DeepEyes_train_4K/train.json both hold doc_id 0."""
    rows = [{**ROW, "doc_id": str(i)} for i in range(3)]
    probe = write_json(tmp_path / "VisualProbe_train" / "train.json", rows)
    deepeyes = write_json(tmp_path / "DeepEyes_train_4K" / "train.json", rows)
    other = write_json(tmp_path / "extra.json", rows[:1])
    prompts = read_datasets([str(probe), str(deepeyes), str(other)])
    assert [p.uid for p in prompts] == [*(f"VisualProbe_train/train/{i}" for i in range(3)),
                                         *(f"DeepEyes_train_4K/train/{i}" for i in range(3)), "extra/0"]
    # folders of the same name too: as many parent folders as make the names differ
    a = write_json(tmp_path / "a" / "split" / "train.json", rows[:1])
    b = write_json(tmp_path / "b" / "split" / "train.json", rows[:1])
    assert dataset_names([a, b, other]) == ["a/split/train", "b/split/train", "extra"]


def test_a_missing_image_names_the_file_row_and_path_when_checked(tmp_path):
    rows = [{**ROW, "doc_id": "0", "images": ["img/there.png"]}, {**ROW, "doc_id": "1", "images": ["img/gone.png"]}]
    path = write_json(tmp_path / "data" / "train.json", rows)
    (tmp_path / "base" / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "base" / "img" / "there.png")
    assert len(read_datasets([str(path)], str(tmp_path / "base"))) == 2  # not checked unless asked
    with pytest.raises(ValueError) as info:
        read_datasets([str(path)], str(tmp_path / "base"), check_images=True)
    assert str(info.value).startswith(f"{path} row 1: image 'img/gone.png' not found: {tmp_path / 'base' / 'img' / 'gone.png'}")
    assert "data.image_dir" in str(info.value)


def test_load_image_errors(tmp_path):
    Image.new("L", (10, 8)).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "grey.png")
    assert image.mode == "RGB" and image.size == (10, 8)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        load_image(tmp_path / "text.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    with pytest.raises(ImageLoadError, match="corrupt or unreadable"):
        load_image(tmp_path / "cut.jpg")


def test_resample_names():
    assert resample_from_name("nearest", "data.crop_resample") == Image.Resampling.NEAREST
    with pytest.raises(ValueError, match="data.crop_resample: unknown resample filter 'cubic'"):
        resample_from_name("cubic", "data.crop_resample")


def test_templates_render_with_placeholders():
    cfg = DataConfig()
    user = render_user_text(cfg, "<image>\nWhat colour is it?", num_images=1)
    assert user.count(VISION_PLACEHOLDER) == 1 and "What colour is it?" in user
    assert "<grounding>{\"bbox_2d\"" in user  # literal braces survive formatting
    # a question without markers gets one per image in front
    assert render_user_text(cfg, "Which?", num_images=2).startswith(VISION_PLACEHOLDER * 2 + "\nWhich?")
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        render_user_text(cfg, "<image><image>", num_images=1)
    observation = render_observation_text(cfg, action=2, observation=3)
    assert observation.startswith("After the above Action 2, here is the the zoom-in image (Observation 3):\n")
    assert observation.count(VISION_PLACEHOLDER) == 1
    parts = render_error_parts(cfg)
    assert len(parts) == 2
    assert "bad box".join(parts).startswith("ERROR occurs during grounding. Error Information: bad box.")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"observation_template": "no image here"}, "observation_template: must contain <image> exactly once"),
        ({"observation_template": "<image> {nope}"}, "observation_template: cannot fill the template"),
        ({"error_template": "{error} <image>"}, "error_template: an error turn carries no image"),
        ({"user_template": "{question} {"}, "user_template: cannot fill"),
        ({"user_template": "<image> {question}"}, "user_template: must not add <image>"),
    ],
)
def test_template_mistakes_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate_templates(DataConfig(**override))


def test_data_config_through_the_loader():
    cfg = load_config(None, ["data.min_pixels=3136", "data.val_files=[a.json, b.json]", "data.crop_resample=nearest"])
    assert cfg.data.val_files == ["a.json", "b.json"] and cfg.data.min_pixels == 3136
    for override, message in [
        ("data.max_pixels=10", "data.max_pixels"),
        ("data.image_resample=cubic", "data.image_resample"),
        ("data.error_template={oops}", "data.error_template"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_synthetic_dataset_needs_a_sample():
    with pytest.raises(ValueError, match="num_samples"):
        write_visual_search_dataset("unused", 0)


# ---------------------------------------------------------------- hostile data files and images (issue 15)


def test_reader_names_the_file_it_cannot_decode(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([{**ROW, "problem": "<image>\nQuelle couleur ? caf\u00e9"}], ensure_ascii=False)
                     .encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json: not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        read_minio3_json(path)


def test_reader_refuses_a_directory_with_a_clear_message(tmp_path):
    (tmp_path / "data.json").mkdir()
    with pytest.raises(ValueError, match=r"data\.json: is a directory, not a dataset file"):
        read_minio3_json(tmp_path / "data.json")
    with pytest.raises(ValueError, match=r"is a directory, not a dataset file"):
        read_datasets([str(tmp_path)])


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps([ROW])[:-1] + ", " + "1" * 5000 + "]", "not valid JSON"),
    (json.dumps([{**ROW, "solution": "x"}]).replace('"x"', "NaN"), "not valid JSON"),
])
def test_reader_turns_every_parse_failure_into_a_message_naming_the_file(tmp_path, text, message):
    path = tmp_path / "odd.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"odd\.json: {message}"):
        read_minio3_json(path)


def test_a_row_without_images_is_an_error_unless_it_says_it_has_none(tmp_path):
    no_key = {k: v for k, v in ROW.items() if k != "images"}
    path = write_json(tmp_path / "bench.json", [ROW, {**no_key, "doc_id": "q2", "problem": "What?"}])
    with pytest.raises(ValueError, match=r"bench\.json row 1: missing key 'images'.*\"images\": \[\] for a text-only"):
        read_minio3_json(path)
    misspelt = write_json(tmp_path / "misspelt.json", [{**no_key, "image": ["a.png"]}])
    with pytest.raises(ValueError, match=r"row 0: missing key 'images'; did you mean 'images' for 'image'\?"):
        read_minio3_json(misspelt)
    explicit = write_json(tmp_path / "text.json", [{**no_key, "images": [], "problem": "What is 2+2?"}])
    (prompt,) = read_minio3_json(explicit)
    assert prompt.image_paths == () and prompt.question == "What is 2+2?"
    empty_path = write_json(tmp_path / "empty.json", [{**ROW, "images": [""]}])
    with pytest.raises(ValueError, match=r"row 0: 'images\[0\]' is an empty path"):
        read_minio3_json(empty_path)


def _pixels(image):
    return np.asarray(image)


def test_16_bit_greyscale_is_scaled_to_8_bit_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    image = load_image(tmp_path / "grey16.png")
    assert image.mode == "RGB"
    assert _pixels(image)[0].tolist() == [[0, 0, 0], [1, 1, 1], [128, 128, 128], [255, 255, 255]]


def test_other_integer_and_float_modes_become_8_bit():
    from megatron_minio3.data.images import to_rgb

    wide = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32), "I")  # 16-bit data held as 32-bit
    assert _pixels(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    big = Image.fromarray(np.array([[-100, 0, 1_000_000]], dtype=np.int32), "I")  # beyond 16 bits: min..max
    assert _pixels(to_rgb(big))[0, :, 0].tolist() == [0, 0, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")  # floats in [0, 1]
    assert _pixels(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    flat = Image.fromarray(np.full((2, 2), 7.0, dtype=np.float32), "F")  # constant: no division by zero
    assert to_rgb(flat).mode == "RGB"
    for mode in ("I;16B", "I;16L"):
        image = Image.new(mode, (2, 1), 65535)
        assert _pixels(to_rgb(image))[0].tolist() == [[255, 255, 255]] * 2


def test_transparent_pixels_become_white_like_the_qwen_pipeline():
    from megatron_minio3.data.images import to_rgb

    rgba = Image.fromarray(np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8), "RGBA")
    assert _pixels(to_rgb(rgba))[0].tolist() == [[255, 0, 0], [255, 255, 255], [127, 127, 127]]
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert _pixels(to_rgb(la))[0].tolist() == [[255, 255, 255], [0, 0, 0]]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0  # palette entry 0 is transparent
    assert _pixels(to_rgb(palette))[0].tolist() == [[255, 255, 255], [0, 255, 0]]


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "PA", "RGB"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    from megatron_minio3.data.images import to_rgb

    image = Image.new(mode, (3, 2))
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (3, 2)


def test_saved_odd_modes_load_as_rgb(tmp_path):
    bitmap = Image.new("1", (4, 1))
    bitmap.putpixel((1, 0), 1)
    bitmap.save(tmp_path / "bits.png")
    assert _pixels(load_image(tmp_path / "bits.png"))[0, :2].tolist() == [[0, 0, 0], [255, 255, 255]]
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    red = _pixels(load_image(tmp_path / "cmyk.jpg"))[0, 0]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)
