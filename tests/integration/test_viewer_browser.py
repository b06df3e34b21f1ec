"""tools/view_trajectories.py end to end: a dump written by the real write_trajectories, the CLI run as a
subprocess, the page loaded from file:// in headless Chromium (Debian's chromium package) over the DevTools
protocol. Checks: no console errors or failed loads, every image loaded, the number of trajectories and
zoom boxes, each box's on-screen position on its source image, the filters and their counter, the text
escaped, the box visible in a screenshot; the --embed page loads its images too."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from megatron_minio3.rollout.trajectory import Trajectory, TrajectoryImage, TurnRecord, write_trajectories
from tests.browser import INSTALL_HINT, Chromium, find_chromium

REPO = Path(__file__).resolve().parents[2]
BOX_RGB = (224, 17, 95)  # .zoom-box border colour in megatron_minio3/viewer.py


def _picture(width: int, height: int, seed: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (200 - 20 * seed, 210, 190 + 15 * seed))
    draw = ImageDraw.Draw(image)
    for i in range(6):
        x, y = (37 * (i + seed) * 7) % width, (53 * (i + 2 * seed) * 5) % height
        draw.ellipse((x, y, x + width // 8, y + height // 8), fill=((60 * i) % 255, 40 * seed, 200 - 30 * i))
    return image


def _prompt_image(raw: Image.Image, path: str) -> TrajectoryImage:
    model = raw.resize((raw.width // 2, raw.height // 2))
    return TrajectoryImage(raw=raw, model=model, grid_thw=(1, 2, 2), origin="prompt", path=path)


def _crop(images: list[TrajectoryImage], source_index: int, box: tuple[int, int, int, int]) -> TrajectoryImage:
    raw = images[source_index].raw.crop(box)
    model = raw.resize((max(raw.width // 2, 1), max(raw.height // 2, 1)))
    return TrajectoryImage(raw=raw, model=model, grid_thw=(1, 2, 2), origin="crop", source_index=source_index, box=box)


def _call(source: str, bbox=(0.1, 0.1, 0.5, 0.5)) -> str:
    return f'<think>Zoom in.</think><grounding>{{"bbox_2d": {list(bbox)}, "source": "{source}"}}</grounding>'


def _turn(tool_call: bool, error: str | None = None, finish: str = "stop", appended: int = 20) -> TurnRecord:
    return TurnRecord(num_generated_tokens=12, finish_reason=finish, tool_call=tool_call, tool_error=error,
                      num_appended_tokens=appended if tool_call else 0)


def _trajectory(uid, sample, source, question, truth, images, turns, texts, *, exceed=False, void=False,
                truncated=False, end_reason="answer") -> Trajectory:
    return Trajectory(
        uid=uid, sample_index=sample, data_source=source, question=question, ground_truth=truth, verifier="mc",
        prompt_length=8, token_ids=[0] * 8, loss_mask=[0] * 8, rollout_logprobs=[0.0] * 8, attention_length=8,
        images=images, turns=turns, turn_texts=texts, exceed=exceed, void=void, truncated=truncated,
        end_reason=end_reason,
    )


def _write_dump(root: Path) -> tuple[Path, dict]:
    """Three prompts, two data sources, eight samples: crops of the prompt image and of an observation, a
    tool error, two exceeded samples (max_turns, context), two void ones (no answer, truncated).
    Prompt image paths are relative to `root` (the directory a run would start from)."""
    (root / "data").mkdir(parents=True)
    raws = {"p1": _picture(400, 300, 0), "p2": _picture(300, 500, 1), "p3": _picture(256, 256, 2)}
    for name, image in raws.items():
        image.save(root / "data" / f"{name}.png")
    question = 'Which <script>alert("x")</script> colour & <b>shape</b>? (A) red (B) blue'
    trajectories, extras = [], []

    def prompt(name):
        return [_prompt_image(raws[name], f"data/{name}.png")]

    # p1 / srcA: a crop of the prompt image, then a crop of that observation; an exceeded one; a tool error.
    images = prompt("p1")
    images.append(_crop(images, 0, (100, 50, 300, 200)))
    images.append(_crop(images, 1, (20, 30, 120, 130)))
    trajectories.append(_trajectory(
        "set/p1", 0, "srcA", question, "B", images, [_turn(True), _turn(True), _turn(False)],
        [_call("original_image"), _call("observation_1"), "<think>Blue, <i>surely</i> & sure.</think><answer>B</answer>"],
    ))
    images = prompt("p1")
    images.append(_crop(images, 0, (0, 0, 200, 150)))
    trajectories.append(_trajectory(
        "set/p1", 1, "srcA", question, "B", images, [_turn(True), _turn(True, appended=0)],
        [_call("original_image"), _call("observation_1")], exceed=True, end_reason="max_turns",
    ))
    trajectories.append(_trajectory(
        "set/p1", 2, "srcA", question, "B", prompt("p1"), [_turn(True, error="bbox_2d must have 4 numbers"), _turn(False)],
        ['<grounding>{"bbox_2d": [1, 2]}</grounding>', "<answer>A</answer>"],
    ))
    extras += [{"score": 1.0, "accuracy": 1.0, "reward_failed": False, "reward_error": None}]
    extras += [{"score": 0.0, "accuracy": 0.0, "reward_failed": False, "reward_error": None}] * 2
    # p2 / srcB: void without an answer, a direct correct answer, a truncated one.
    images = prompt("p2")
    images.append(_crop(images, 0, (50, 100, 250, 400)))
    trajectories.append(_trajectory(
        "set/p2", 0, "srcB", "How many dots?", "3", images, [_turn(True), _turn(False)],
        [_call("original_image"), "<think>Not sure.</think>"], void=True, end_reason="no_answer",
    ))
    trajectories.append(_trajectory("set/p2", 1, "srcB", "How many dots?", "3", prompt("p2"), [_turn(False)],
                                    ["<answer>3</answer>"]))
    trajectories.append(_trajectory(
        "set/p2", 2, "srcB", "How many dots?", "3", prompt("p2"), [_turn(False, finish="length")],
        ["<think>one two three four"], void=True, truncated=True, end_reason="length",
    ))
    extras += [
        {"score": 0.0, "accuracy": 0.0, "reward_failed": False, "reward_error": None},
        {"score": 1.0, "accuracy": 1.0, "reward_failed": False, "reward_error": None},
        {"score": 0.0, "accuracy": 0.0, "reward_failed": True, "reward_error": "judge timed out"},
    ]
    # p3 / srcA, training-rollout style extras (advantage, no reward_failed): a crop; an exceeded (context) one.
    for sample, (box, exceed) in enumerate((((16, 32, 144, 224), False), ((128, 0, 256, 128), True))):
        images = prompt("p3")
        images.append(_crop(images, 0, box))
        last = _turn(True, appended=0) if exceed else _turn(False)
        trajectories.append(_trajectory(
            "set/p3", sample, "srcA", "Where is the dot?", "(12,40)", images, [_turn(True), last],
            [_call("original_image"), _call("observation_1") if exceed else "<answer>(12,40)</answer>"],
            exceed=exceed, end_reason="context" if exceed else "answer",
        ))
    extras += [{"score": 1.0, "accuracy": 1.0, "advantage": 0.7}, {"score": 0.0, "accuracy": 0.0, "advantage": -0.7}]

    dump = root / "run" / "eval" / "step_0"
    write_trajectories(trajectories, dump, extras=extras)
    # What the page must show: every crop's box as a fraction of its source's raw size.
    boxes = {}
    for traj in trajectories:
        for index, image in enumerate(traj.images):
            if image.origin == "crop":
                width, height = traj.images[image.source_index].raw.size
                left, top, right, bottom = image.box
                boxes[f"{traj.uid}#{traj.sample_index}#{index}"] = {
                    "fractions": [left / width, top / height, right / width, bottom / height],
                    "source_width": width,
                }
    expected = {
        "trajectories": len(trajectories),
        "boxes": boxes,
        "incorrect": sum(e["accuracy"] < 0.5 for e in extras),
        "incorrect_exceed": sum(e["accuracy"] < 0.5 and t.exceed for t, e in zip(trajectories, extras)),
        "void": sum(t.void for t in trajectories),
        "srcB": sum(t.data_source == "srcB" for t in trajectories),
    }
    return dump, expected


_MEASURE_BOXES = """
Array.from(document.querySelectorAll('.zoom-box')).map(function(box){
  var img = box.parentElement.querySelector('img'), b = box.getBoundingClientRect(), i = img.getBoundingClientRect();
  var traj = box.closest('.traj');
  return {key: traj.dataset.uid + '#' + traj.dataset.sample + '#' + box.dataset.cropIndex,
          fractions: [(b.left - i.left) / i.width, (b.top - i.top) / i.height, (b.right - i.left) / i.width,
                      (b.bottom - i.top) / i.height],
          shown: [i.width, i.height], natural: img.naturalWidth};
})
"""

_BROKEN_IMAGES = (
    "Array.from(document.images).filter(function(i){ return !(i.complete && i.naturalWidth > 0); })"
    ".map(function(i){ return i.src.slice(0, 200); })"
)


def _set_filters(browser: Chromium, source: str = "", correct: str = "all", flag: str = "") -> tuple[str, int]:
    """Set the three selects as a user would (value + change event); (counter text, visible .traj count)."""
    return tuple(browser.evaluate(f"""(function(){{
        var values = {{'f-source': {json.dumps(source)}, 'f-correct': {json.dumps(correct)}, 'f-flag': {json.dumps(flag)}}};
        Object.keys(values).forEach(function(id){{
            var el = document.getElementById(id); el.value = values[id];
            el.dispatchEvent(new Event('change', {{bubbles: true}}));
        }});
        var visible = Array.from(document.querySelectorAll('.traj')).filter(function(t){{ return t.offsetParent !== null; }});
        return [document.getElementById('counter').textContent, visible.length];
    }})()"""))


def test_viewer_in_headless_chromium(tmp_path):
    if find_chromium() is None:
        pytest.skip(f"chromium is not installed; {INSTALL_HINT}")
    dump, expected = _write_dump(tmp_path)
    html_path = dump / "view.html"
    embed_path = tmp_path / "elsewhere" / "embedded.html"
    cli = REPO / "tools" / "view_trajectories.py"
    # Run from the run directory: the prompt images' relative paths resolve through the dump's ancestors.
    for args in ([str(dump), "-o", str(html_path)], [str(dump / "trajectories.jsonl"), "-o", str(embed_path), "--embed"]):
        done = subprocess.run([sys.executable, str(cli), *args], cwd=dump.parent.parent, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{expected['trajectories']} trajectories, {len(expected['boxes'])} boxes" in done.stderr
    embedded = embed_path.read_text()
    assert "data:image/png;base64," in embedded and "images/" not in embedded.split("<main>")[1].split("<script")[0]

    total = expected["trajectories"]
    with Chromium(tmp_path / "browser") as browser:
        browser.navigate(html_path.as_uri())
        assert browser.errors == []
        assert browser.evaluate(_BROKEN_IMAGES) == []
        assert browser.evaluate("document.querySelectorAll('.traj').length") == total
        assert browser.evaluate("document.querySelectorAll('section.prompt').length") == 3
        assert browser.evaluate("document.getElementById('counter').textContent") == f"showing {total} of {total} trajectories"

        # Text is escaped: the question's tags show as text, nothing from it became an element or ran.
        question = browser.evaluate("document.querySelector('.question pre').textContent")
        assert '<script>alert("x")</script>' in question and "<b>shape</b>" in question
        assert browser.evaluate("document.querySelectorAll('.question pre *, pre.text i').length") == 0
        texts = browser.evaluate("Array.from(document.querySelectorAll('pre.text')).map(function(p){ return p.textContent; })")
        assert "<think>Blue, <i>surely</i> & sure.</think><answer>B</answer>" in texts

        # One box per crop, each where its box lies on the (raw) source image.
        measured = {entry["key"]: entry for entry in browser.evaluate(_MEASURE_BOXES)}
        assert sorted(measured) == sorted(expected["boxes"])
        for key, want in expected["boxes"].items():
            got = measured[key]
            assert got["natural"] == want["source_width"], f"{key}: the source is not shown at its raw size"
            tolerance = [1.5 / got["shown"][0], 1.5 / got["shown"][1]] * 2
            for axis, (g, w, tol) in enumerate(zip(got["fractions"], want["fractions"], tolerance)):
                assert abs(g - w) <= tol, f"{key}: edge {axis} at {g:.4f} of the image, expected {w:.4f}"
        # The crop of an observation is drawn on that observation (its raw crop, 200x150), not on the prompt image.
        assert measured["set/p1#0#2"]["fractions"] == pytest.approx([0.1, 0.2, 0.6, 130 / 150], abs=0.01)
        box = "document.querySelector('.traj[data-sample=\"0\"] .zoom-box[data-crop-index=\"2\"]')"
        assert browser.evaluate(box + ".dataset.sourceIndex") == "1"
        # Flags and errors are shown.
        assert browser.evaluate("document.querySelectorAll('.tool-error').length") == 1
        assert browser.evaluate("document.querySelectorAll('.not-run').length") == 2
        assert "judge timed out" in browser.evaluate("document.querySelector('.reward-error').textContent")
        p3 = "document.querySelector('section.prompt[data-uid=\"set/p3\"] .numbers')"
        assert "advantage" in browser.evaluate(p3 + ".textContent")

        # Filters: the counter and the visible trajectories follow.
        for filters, count in (
            ({"correct": "incorrect"}, expected["incorrect"]),
            ({"correct": "incorrect", "flag": "exceed"}, expected["incorrect_exceed"]),
            ({"flag": "void"}, expected["void"]),
            ({"source": "srcB"}, expected["srcB"]),
            ({"source": "srcB", "correct": "correct"}, 1),
            ({"flag": "clean"}, 3),  # set/p1#0, set/p2#1, set/p3#0: no flag, no tool error, reward scored
            ({}, total),
        ):
            text, visible = _set_filters(browser, **filters)
            assert (text, visible) == (f"showing {count} of {total} trajectories", count), filters
        assert browser.evaluate("document.querySelectorAll('section.prompt:not([hidden])').length") == 3
        _set_filters(browser, source="srcB")
        shown = "Array.from(document.querySelectorAll('section.prompt:not([hidden])'))"
        assert browser.evaluate(shown + ".map(function(p){ return p.dataset.uid; })") == ["set/p2"]
        _set_filters(browser)

        # Screenshot with the first box in view; its border is in the picture where the page says it is.
        rect = browser.evaluate("""(function(){ var b = document.querySelector('.zoom-box');
            b.scrollIntoView({block: 'center'}); var r = b.getBoundingClientRect();
            return [r.left, r.top, r.width, r.height, window.devicePixelRatio]; })()""")
        png = browser.screenshot(tmp_path / "viewer.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
        shot = Image.open(io.BytesIO(png)).convert("RGB")
        assert shot.width >= 800 and len(shot.getcolors(1 << 20) or range(1 << 20)) > 50
        left, top, width, height, ratio = rect
        edge = shot.getpixel((int((left + 1) * ratio), int((top + height / 2) * ratio)))
        assert max(abs(a - b) for a, b in zip(edge, BOX_RGB)) < 40, f"box border pixel {edge}"

        # The --embed page, moved away from the dump, has every image inline.
        browser.navigate(embed_path.as_uri())
        assert browser.evaluate(_BROKEN_IMAGES) == []
        assert browser.evaluate(
            "Array.from(document.images).every(function(i){ return i.src.startsWith('data:image/png;base64,'); })"
        )
        assert browser.evaluate("document.querySelectorAll('.zoom-box').length") == len(expected["boxes"])
        assert browser.errors == []
        env_left = browser.leftover_processes
    assert env_left() == {}, "chromium processes left after close"
