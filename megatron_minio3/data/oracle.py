"""Oracle trajectories for cold-start SFT on the synthetic visual-search task (data/synthetic.py).

Each task becomes a conversation in the rollout's own words (the data.* templates): the question, then
assistant turns `<think>...</think><grounding>{...}</grounding>` answered by observation turns holding the
crop, then `<think>...</think><answer>...</answer>`. Three kinds, drawn per task:

    direct     zoom on a box holding the target, answer                                       (share 1 - 2p)
    recovery   zoom somewhere without the target, see nothing, zoom on the target, answer      (share p)
    refine     zoom on a wide box holding the target, then into observation_1 around it, answer (share p)

Boxes are relative to their source (the original image, or observation_1 for the refining zoom), squares of a
fixed side with corners on a 0.1 grid (so their numbers are few and short), drawn among every such box that
holds the whole target (the jitter). Crops are cut exactly as the rollout cuts them
(rollout/crop_tool.py) from the raw image, and the file is LLaMA-Factory sharegpt JSON (data/sharegpt.py
reads it): {"system", "conversations": [{"from": "human"|"gpt", "value"}], "images": [paths]}; the first image
is the task's image, the others are the raw crops in order.

    python -m megatron_minio3.data.oracle --tasks DATA/visual_search.json --out DIR [--config FILE] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from megatron_minio3.config.data import DataConfig
from megatron_minio3.data.images import load_image
from megatron_minio3.data.templates import observation_message, user_message

KINDS = ("direct", "recovery", "refine")
PERCEPTION_QUESTION = "<image>\nWhat colour is the framed square? Answer with the colour's name."


@dataclass(frozen=True)
class OracleSpec:
    detour_share: float = 0.2  # share of "recovery" tasks, and of "refine" tasks
    grid: float = 0.1  # box corners lie on this grid of the source (one decimal: few, easy tokens)
    zoom_side: float = 0.2  # side of a zoom box, relative to its source
    wide_side: float = 0.4  # side of the first, wide box of a "refine" task
    # Extra single-turn "perception" conversations (a file of their own) for this share of the tasks: the final
    # crop alone, "what colour is the framed square?", answered with the colour. A stand-in for what a pretrained
    # VLM brings (reading a zoomed-in view): the random-weight demo model learns colours only with them.
    perception_share: float = 0.0


def _grid_boxes(target: tuple[float, ...], side: float, grid: float) -> list[tuple[float, float, float, float]]:
    """Every box of `side` with corners on the grid that holds the whole target (inside [0, 1])."""
    steps = round(1 / grid)
    cells = round(side / grid)
    boxes = []
    for i in range(steps - cells + 1):
        for j in range(steps - cells + 1):
            x0, y0 = i * grid, j * grid
            if x0 <= target[0] and target[2] <= x0 + side and y0 <= target[1] and target[3] <= y0 + side:
                boxes.append((round(x0, 2), round(y0, 2), round(x0 + side, 2), round(y0 + side, 2)))
    return boxes


def _box_around(target: tuple[float, ...], side: float, grid: float, rng: np.random.Generator
                ) -> tuple[float, float, float, float]:
    """A grid box of `side` holding the target, drawn among all of them (the jitter); a larger one when the
    target straddles every box of that side."""
    while side <= 1.0:
        boxes = _grid_boxes(target, side, grid)
        if boxes:
            return boxes[int(rng.integers(len(boxes)))]
        side = round(side + grid, 2)
    return (0.0, 0.0, 1.0, 1.0)


def _box_elsewhere(target: tuple[float, ...], side: float, grid: float, rng: np.random.Generator
                   ) -> tuple[float, float, float, float]:
    """A grid box of `side` that does not touch the target."""
    steps = round(1 / grid) - round(side / grid)
    for _ in range(100):
        x0, y0 = (round(int(v) * grid, 2) for v in rng.integers(0, steps + 1, size=2))
        box = (x0, y0, round(x0 + side, 2), round(y0 + side, 2))
        if box[2] <= target[0] or target[2] <= box[0] or box[3] <= target[1] or target[3] <= box[1]:
            return box
    raise AssertionError("no free box: the target covers the image")


def _within(inner: tuple[float, ...], outer: tuple[float, ...]) -> tuple[float, float, float, float]:
    """`inner` (relative to the image) relative to the crop `outer`."""
    w, h = outer[2] - outer[0], outer[3] - outer[1]
    return ((inner[0] - outer[0]) / w, (inner[1] - outer[1]) / h, (inner[2] - outer[0]) / w, (inner[3] - outer[1]) / h)


def grounding(box: tuple[float, ...], source: str) -> str:
    coords = ", ".join(f"{v:.1f}" for v in box)
    return f'<grounding>{{"bbox_2d": [{coords}], "source": "{source}"}}</grounding>'


def answer_text(row: dict) -> str:
    return f"<answer>({row['solution']})</answer>" if row.get("question_kind") == "mc" else \
        f"<answer>{row['solution']}</answer>"


@dataclass(frozen=True)
class OracleConversation:
    kind: str
    turns: list[tuple[str, str]]  # (role, text) after the first user turn: assistant / observation
    zooms: list[tuple[tuple[float, float, float, float], int]]  # (relative box, source index) per zoom


def plan_conversation(row: dict, rng: np.random.Generator, spec: OracleSpec) -> OracleConversation:
    """The assistant turns and zooms for one task (texts only; the crops follow from the zooms)."""
    target = tuple(row["target_bbox"])
    draw = rng.random()
    kind = "recovery" if draw < spec.detour_share else "refine" if draw < 2 * spec.detour_share else "direct"
    see = f"<think>It is {row['colour']}.</think>{answer_text(row)}"
    zoom = "<think>Zoom in.</think>"
    if kind == "direct":
        box = _box_around(target, spec.zoom_side, spec.grid, rng)
        assistant, zooms = [zoom + grounding(box, "original_image"), see], [(box, 0)]
    elif kind == "recovery":
        box = _box_around(target, spec.zoom_side, spec.grid, rng)
        wrong = _box_elsewhere(target, spec.zoom_side, spec.grid, rng)
        assistant = [zoom + grounding(wrong, "original_image"),
                     "<think>Not here.</think>" + grounding(box, "original_image"), see]
        zooms = [(wrong, 0), (box, 0)]
    else:
        wide = _box_around(target, spec.wide_side, spec.grid, rng)
        inner = _box_around(_within(target, wide), spec.zoom_side / (wide[2] - wide[0]), spec.grid, rng)
        assistant = [zoom + grounding(wide, "original_image"),
                     "<think>Closer.</think>" + grounding(inner, "observation_1"), see]
        zooms = [(wide, 0), (inner, 1)]
    turns: list[tuple[str, str]] = []
    for index, text in enumerate(assistant):
        turns.append(("assistant", text))
        if index < len(zooms):
            turns.append(("observation", ""))
    return OracleConversation(kind, turns, zooms)


def crop_sources(raw: Image.Image, assistant_texts: list[str]) -> list[Image.Image]:
    """The raw crops the turns ask for, cut as the rollout cuts them: each tool call's text parsed
    (parse_grounding) and located (locate_crop) among the observations so far, relative coordinates."""
    from megatron_minio3.rollout.crop_tool import has_tool_call, locate_crop, parse_grounding

    observations = [raw]
    for text in assistant_texts:
        if has_tool_call(text):
            index, pixels = locate_crop([image.size for image in observations], parse_grounding(text), relative=True)
            observations.append(observations[index].crop(pixels))
    return observations[1:]


def write_oracle_dataset(tasks_json: str | Path, out_dir: str | Path, data_cfg: DataConfig, *, seed: int = 0,
                         spec: OracleSpec = OracleSpec(), name: str = "oracle") -> Path:
    """One sharegpt conversation per task of `tasks_json` (synthetic rows) in out_dir/<name>.json, crops under
    out_dir/crops; with spec.perception_share, the perception conversations in out_dir/<name>_perception.json."""
    tasks_json, out_dir = Path(tasks_json), Path(out_dir)
    rows = json.loads(tasks_json.read_text(encoding="utf-8"))
    (out_dir / "crops").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records, perception = [], []
    for row in rows:
        image_path = tasks_json.parent / row["images"][0]
        raw = load_image(image_path)
        plan = plan_conversation(row, rng, spec)
        crop_paths = []
        assistant_texts = [text for role, text in plan.turns if role == "assistant"]
        for index, crop in enumerate(crop_sources(raw, assistant_texts), start=1):
            path = out_dir / "crops" / f"{row['doc_id']}_{index}.png"
            crop.save(path)
            crop_paths.append(str(path.relative_to(out_dir)))
        conversation = [{"from": "human", "value": user_message(data_cfg, row["problem"], 1)}]
        observation = 0
        for role, text in plan.turns:
            if role == "assistant":
                conversation.append({"from": "gpt", "value": text})
            else:
                observation += 1
                conversation.append({"from": "human", "value": observation_message(
                    data_cfg, action=observation - 1, observation=observation)})
        records.append({
            "id": row["doc_id"], "kind": plan.kind, "data_source": row["data_source"],
            "system": data_cfg.system_prompt, "conversations": conversation,
            "images": [str(Path(image_path).resolve())] + crop_paths,
        })
        if spec.perception_share and rng.random() < spec.perception_share:
            perception.append({
                "id": f"{row['doc_id']}-perception", "kind": "perception", "data_source": row["data_source"],
                "system": data_cfg.system_prompt, "images": [crop_paths[-1]],
                "conversations": [
                    {"from": "human", "value": user_message(data_cfg, PERCEPTION_QUESTION, 1)},
                    {"from": "gpt", "value": f"<think>It is {row['colour']}.</think><answer>{row['colour']}</answer>"},
                ],
            })
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    if perception:
        (out_dir / f"{name}_perception.json").write_text(json.dumps(perception, indent=1), encoding="utf-8")
    return path


def main() -> None:
    from megatron_minio3.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", required=True, help="a synthetic task file (python -m megatron_minio3.data.synthetic)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default=None, help="the run's config: its data.* templates are used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="oracle")
    parser.add_argument("--perception-share", type=float, default=0.0,
                        help="add a single-turn colour question on the final crop for this share of the tasks")
    args = parser.parse_args()
    data_cfg = load_config(args.config).data if args.config else DataConfig()
    spec = OracleSpec(perception_share=args.perception_share)
    print(write_oracle_dataset(args.tasks, args.out, data_cfg, seed=args.seed, spec=spec, name=args.name))


if __name__ == "__main__":
    main()
