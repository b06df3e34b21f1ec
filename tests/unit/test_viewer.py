"""megatron_minio3/viewer.py without a browser: the box scale from raw_size or the raw files, the fallbacks of
older dumps, the turn-to-crop matching, missing extras, --max-prompts, escaping. (The page itself is tested
in headless Chromium: tests/integration/test_viewer_browser.py.)"""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from megatron_minio3.rollout.trajectory import Trajectory, TrajectoryImage, TurnRecord, write_trajectories
from megatron_minio3.viewer import _crop_for_turns, build_viewer, find_jsonl


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))

    def with_class(self, name: str) -> list[dict[str, str]]:
        return [a for _, a in self.elements if name in a.get("class", "").split()]


def _parse(path: Path) -> _Elements:
    parser = _Elements()
    parser.feed(path.read_text())
    return parser


def _dump(tmp_path: Path) -> Path:
    """Two prompts: p1's raw image exists (400x200, path relative to tmp_path), p2's path is gone."""
    raw1, raw2 = Image.new("RGB", (400, 200), "red"), Image.new("RGB", (300, 300), "blue")
    raw1.save(tmp_path / "p1.png")
    trajectories = []
    for uid, raw, path in (("p1", raw1, "p1.png"), ("p2", raw2, "gone/p2.png")):
        prompt = TrajectoryImage(raw=raw, model=raw.resize((raw.width // 4, raw.height // 4)), grid_thw=(1, 2, 2),
                                 origin="prompt", path=path)
        crop_raw = raw.crop((100, 50, 200, 150))
        crop = TrajectoryImage(raw=crop_raw, model=crop_raw.resize((50, 50)), grid_thw=(1, 2, 2), origin="crop",
                               source_index=0, box=(100, 50, 200, 150))
        trajectories.append(Trajectory(
            uid=uid, sample_index=0, data_source="s", question="q <x>", ground_truth="a", verifier=None,
            prompt_length=1, token_ids=[0], loss_mask=[0], rollout_logprobs=[0.0], attention_length=1,
            images=[prompt, crop], turns=[TurnRecord(5, "stop", True, num_appended_tokens=3), TurnRecord(5, "stop", False)],
            turn_texts=['<grounding>{"bbox_2d": [1, 2, 3, 4]}</grounding>', "<answer>a</answer>"],
            exceed=False, void=False, truncated=False, end_reason="answer",
        ))
    dump = tmp_path / "run" / "rollouts" / "step_1"
    write_trajectories(trajectories, dump, extras=[{"accuracy": 1.0, "advantage": 0.5, "my_key": 3}, {}])
    return dump


def _boxes(html: Path) -> dict[str, dict[str, str]]:
    return {a["data-box"] + "@" + a["data-raw-size"]: a for a in _parse(html).with_class("zoom-box")}


def _rewrite(dump: Path, change) -> None:
    path = dump / "trajectories.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        for entry in record["images"]:
            change(entry)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_box_scale_from_raw_size_or_raw_files(tmp_path, monkeypatch):
    dump = _dump(tmp_path)
    monkeypatch.chdir(dump)  # not the run directory: p1.png is found through the dump's ancestors
    _rewrite(dump, lambda entry: entry.pop("raw_size", None))
    stats = build_viewer(dump, tmp_path / "a.html", log=None)
    assert (stats.num_trajectories, stats.num_boxes, stats.num_approximate_boxes) == (2, 2, 1)
    boxes = _parse(tmp_path / "a.html").with_class("zoom-box")
    # p1: raw size read from the raw image; p2: no raw image, the model-side size (75x75) with an "approx" mark.
    assert [(b["data-raw-size"], "approx" in b["class"]) for b in boxes] == [("400,200", False), ("75,75", True)]
    assert "left:25.0000%;top:25.0000%;width:25.0000%;height:50.0000%" in boxes[0]["style"]
    imgs = [a["src"] for tag, a in _parse(tmp_path / "a.html").elements if tag == "img"]
    assert "p1.png" in imgs and "run/rollouts/step_1/images/p2/prompt_0_model.png" in imgs

    _rewrite(dump, lambda entry: entry.update(raw_size=[300, 300]) if entry["origin"] == "prompt" else None)
    stats = build_viewer(dump / "trajectories.jsonl", tmp_path / "b.html", log=None)
    assert stats.num_approximate_boxes == 0
    assert [b["data-raw-size"] for b in _parse(tmp_path / "b.html").with_class("zoom-box")] == ["300,300", "300,300"]


def test_extras_flags_escaping_and_max_prompts(tmp_path):
    dump = _dump(tmp_path)
    build_viewer(dump, None, log=None)
    page = dump / "trajectories.html"
    trajs = _parse(page).with_class("traj")
    assert [(t["data-uid"], t["data-correct"], t["data-exceed"]) for t in trajs] == [("p1", "1", "0"), ("p2", "", "0")]
    text = page.read_text()
    assert "q &lt;x&gt;" in text and "advantage <b>0.5</b>" in text and "my_key=3" in text
    assert "<x>" not in text
    build_viewer(dump, tmp_path / "one.html", max_prompts=1, log=None)
    assert len(_parse(tmp_path / "one.html").with_class("traj")) == 1
    with pytest.raises(FileNotFoundError):
        find_jsonl(tmp_path / "nowhere")


def test_crops_follow_turns_without_errors_or_a_final_exceeded_call():
    images = [{"origin": "prompt"}, {"origin": "crop"}, {"origin": "crop"}]
    turns = [
        {"tool_call": True, "tool_error": None},
        {"tool_call": True, "tool_error": "bad box"},
        {"tool_call": False, "tool_error": None},
        {"tool_call": True, "tool_error": None},
        {"tool_call": True, "tool_error": None},
    ]
    assert _crop_for_turns({"images": images, "turns": turns, "exceed": True}) == [1, None, None, 2, None]


def test_training_dump_reads_every_handle_file_and_groups_by_round(tmp_path):
    raw = Image.new("RGB", (64, 64), "green")
    raw.save(tmp_path / "p.png")

    def traj(uid, sample):
        prompt = TrajectoryImage(raw=raw, model=raw, grid_thw=(1, 2, 2), origin="prompt", path=str(tmp_path / "p.png"))
        return Trajectory(
            uid=uid, sample_index=sample, data_source="s", question="q", ground_truth="a", verifier="mc",
            prompt_length=1, token_ids=[0], loss_mask=[0], rollout_logprobs=[0.0], attention_length=1,
            images=[prompt], turns=[TurnRecord(3, "stop", False)], turn_texts=["<answer>a</answer>"],
            exceed=False, void=False, truncated=False, end_reason="answer",
        )

    dump = tmp_path / "rollouts" / "step_00000003"
    extra = {"score": 1.0, "accuracy": 1.0, "reward_failed": False, "reward_error": None, "step": 3}
    # handle 0: uid a in round 0 (dropped: all correct) and again in round 1; handle 1: uid b.
    write_trajectories([traj("a", 0), traj("a", 1)], dump, file_name="trajectories_handle0.jsonl",
                       extras=[{**extra, "advantage": 0.0, "kept": False, "round": 0}] * 2)
    write_trajectories([traj("a", 0)], dump, file_name="trajectories_handle0.jsonl", append=True,
                       extras=[{**extra, "advantage": 0.0, "kept": True, "round": 1}])
    write_trajectories([traj("b", 0)], dump, file_name="trajectories_handle1.jsonl",
                       extras=[{**extra, "advantage": 1.2, "kept": True, "round": 0}])
    stats = build_viewer(dump, None, log=None)
    assert (stats.num_prompts, stats.num_trajectories, stats.num_boxes) == (3, 4, 0)
    page = _parse(dump / "trajectories.html")
    samples = [(t["data-uid"], t["data-dropped"]) for t in page.with_class("traj")]
    assert samples == [("a", "1"), ("a", "1"), ("a", "0"), ("b", "0")]
    assert any(tag == "option" and a.get("value") == "dropped" for tag, a in page.elements)
    text = (dump / "trajectories.html").read_text()
    assert "round 1" in text and "dropped (not kept)" in text and "advantage <b>1.2</b>" in text
