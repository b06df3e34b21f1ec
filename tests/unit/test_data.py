"""Mini-o3 JSON reader, image loading, templates, the synthetic task generator and data config checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from megatron_minio3.config.data import DataConfig
from megatron_minio3.config.loader import ConfigError, load_config
from megatron_minio3.data.images import ImageLoadError, load_image, resample_from_name
from megatron_minio3.data.minio3_json import read_datasets, read_minio3_json
from megatron_minio3.data.synthetic import DATA_SOURCE, VisualSearchSpec, write_visual_search_dataset
from megatron_minio3.data.templates import (
    VISION_PLACEHOLDER,
    render_error_parts,
    render_observation_text,
    render_user_text,
    validate_templates,
)

ROW = {"images": ["a.png"], "doc_id": "q1", "problem": "<image>\nWhat?", "solution": "B", "data_source": "vstar"}


def write_json(path, rows):
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
    (tmp_path / "x").mkdir()
    rows = [{**ROW, "doc_id": str(i)} for i in range(5)]
    first = write_json(tmp_path / "bench.json", rows)
    second = write_json(tmp_path / "other.json", rows)
    assert len(read_datasets([str(first), str(second)], max_prompts_per_file=2)) == 4
    clash = write_json(tmp_path / "x" / "bench.json", rows)
    with pytest.raises(ValueError, match="also appears in an earlier file"):
        read_datasets([str(first), str(clash)])


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


def test_synthetic_dataset_has_known_answers(tmp_path):
    spec = VisualSearchSpec(width=448, height=336, num_distractors=10)
    path = write_visual_search_dataset(tmp_path, 6, seed=3, spec=spec)
    prompts = read_minio3_json(path)
    rows = json.loads(path.read_text())
    assert len(prompts) == 6 and all(p.data_source == DATA_SOURCE for p in prompts)
    for prompt, row in zip(prompts, rows):
        image = load_image(prompt.image_paths[0])
        assert image.size == (448, 336)
        letter = prompt.answer
        # the right option names the colour of the triangle drawn at target_bbox
        option = next(line for line in prompt.question.splitlines() if line.startswith(f"({letter})"))
        colour = option.split(") ", 1)[1]
        from megatron_minio3.data.synthetic import COLOURS

        x0, y0, x1, y1 = row["target_bbox"]
        cx, cy = int((x0 + x1) / 2 * 448), int((y0 * 0.2 + y1 * 0.8) * 336)  # inside the triangle, near its base
        assert tuple(np.asarray(image)[cy, cx]) == COLOURS[colour]
        assert (x1 - x0) * 448 < 20  # small target
    # same seed, same bytes
    again = write_visual_search_dataset(tmp_path / "again", 6, seed=3, spec=spec)
    assert again.read_text() == path.read_text()
    with pytest.raises(ValueError, match="num_samples"):
        write_visual_search_dataset(tmp_path, 0)
