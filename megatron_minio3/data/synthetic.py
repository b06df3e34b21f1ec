"""Synthetic visual search: a small target among distractors in a large image, with a known answer and box.

The target is a small square of one colour with a thick black frame; the distractors are discs of every
colour and black rings without a fill. At the model's input resolution of the full image (data.max_pixels)
the target is a speck a few pixels wide whose colour is not readable, while in a crop around it (resized for
the model like every observation) it spans many pixels: zooming is what answers the question. Each row has
the question ("What colour is the framed square?"), the answer, the target's relative box, a difficulty and
a verifier:

    difficulty  target size (share of the short side)  where it can be            distractors
    easy        4.5 %                                    the middle 15 % of each side  12
    medium      3.2 %                                    the middle 50 %               28
    hard        2.2 %                                    anywhere                      48

The background is colourless clutter and no distractor comes within `clearance` (10 % of the short side) of the
target, so a zoom onto the target shows its colour and nothing else that could be taken for it.
    multiple choice   "(A) red (B) green (C) blue (D) yellow", answer the letter   verifier "mc"
    free form         answer the colour's name                                      verifier "exact"

The options are always listed in the same order, so the answer depends on what the model sees and nothing else.
Everything is deterministic by seed. `check_readability` verifies a rendered task against the model's image
sizes: the target is inside the image, never overlapped, at most `max_full_px` pixels wide in the full image the
model sees and at least `min_crop_px` wide in the oracle crop the model would see (data/oracle.py).

    python -m megatron_minio3.data.synthetic --out DIR --num-samples 64 [--difficulty easy,medium,hard] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DATA_SOURCE = "synthetic_visual_search"
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
    "white": (250, 250, 250),
    "cyan": (20, 200, 210),
}
ANSWER_COLOURS = ("red", "green", "blue", "yellow")  # the targets' colours, in option order
OPTION_LETTERS = "ABCD"
DIFFICULTIES = ("easy", "medium", "hard")
QUESTION_KINDS = ("mc", "free")
_PRESETS = {  # difficulty: (target fraction of the short side, position spread, distractors)
    "easy": (0.045, 0.15, 12),
    "medium": (0.032, 0.5, 28),
    "hard": (0.022, 1.0, 48),
}


@dataclass(frozen=True)
class VisualSearchSpec:
    width: int = 896
    height: int = 672
    difficulty: str = "medium"
    # None = the difficulty's preset (table in the module docstring)
    target_fraction: float | None = None  # target side as a share of the shorter image side
    position_spread: float | None = None  # the target's centre lies in the middle `spread` of each side
    num_distractors: int | None = None
    question_kinds: tuple[str, ...] = QUESTION_KINDS  # one is drawn per row
    clearance: float = 0.1  # no distractor within this share of the short side around the target

    def resolved(self) -> VisualSearchSpec:
        if self.difficulty not in _PRESETS:
            raise ValueError(f"difficulty must be one of {DIFFICULTIES}, got {self.difficulty!r}")
        unknown = set(self.question_kinds) - set(QUESTION_KINDS)
        if unknown or not self.question_kinds:
            raise ValueError(f"question_kinds must be a non-empty subset of {QUESTION_KINDS}, got {self.question_kinds}")
        fraction, spread, distractors = _PRESETS[self.difficulty]
        return replace(
            self,
            target_fraction=fraction if self.target_fraction is None else self.target_fraction,
            position_spread=spread if self.position_spread is None else self.position_spread,
            num_distractors=distractors if self.num_distractors is None else self.num_distractors,
        )


@dataclass(frozen=True)
class Task:
    image: Image.Image
    colour: str  # the target's colour name
    box: tuple[float, float, float, float]  # the target's relative box (x0, y0, x1, y1)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def draw_task(rng: np.random.Generator, spec: VisualSearchSpec) -> Task:
    """One image with its target; distractors keep `clearance` (at least half the target's side) away from it."""
    spec = spec.resolved()
    width, height = spec.width, spec.height
    grey = rng.integers(150, 230, size=(height // 8 + 1, width // 8 + 1, 1), dtype=np.uint8)  # colourless clutter
    image = Image.fromarray(np.repeat(grey, 3, axis=2), "RGB").resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    short_side = min(width, height)
    side = max(8, int(round(short_side * spec.target_fraction)))
    spread = spec.position_spread
    low_x, high_x = (1 - spread) / 2 * width, (1 + spread) / 2 * width
    low_y, high_y = (1 - spread) / 2 * height, (1 + spread) / 2 * height
    x0 = int(np.clip(rng.uniform(low_x, high_x) - side / 2, 0, width - side))
    y0 = int(np.clip(rng.uniform(low_y, high_y) - side / 2, 0, height - side))
    target = (x0, y0, x0 + side, y0 + side)
    names = list(COLOURS)
    placed = 0
    for _ in range(spec.num_distractors * 20):  # rejection sampling around the target
        if placed == spec.num_distractors:
            break
        size = int(rng.integers(max(4, side // 2), max(6, side * 2)))
        x = int(rng.integers(0, width - size))
        y = int(rng.integers(0, height - size))
        if _overlaps((x, y, x + size, y + size), target, margin=max(side // 2, int(spec.clearance * short_side))):
            continue
        if rng.random() < 0.7:
            draw.ellipse((x, y, x + size, y + size), fill=COLOURS[names[int(rng.integers(len(names)))]])
        else:
            draw.ellipse((x, y, x + size, y + size), outline=(10, 10, 10), width=max(2, size // 6))
        placed += 1
    colour = ANSWER_COLOURS[int(rng.integers(len(ANSWER_COLOURS)))]
    frame = max(2, side // 5)
    draw.rectangle(target, fill=(10, 10, 10))
    draw.rectangle((x0 + frame, y0 + frame, x0 + side - frame, y0 + side - frame), fill=COLOURS[colour])
    box = (x0 / width, y0 / height, (x0 + side) / width, (y0 + side) / height)
    return Task(image, colour, box)


def question_row(rng: np.random.Generator, index: int, image_name: str, task: Task, spec: VisualSearchSpec) -> dict:
    kind = spec.question_kinds[int(rng.integers(len(spec.question_kinds)))]
    if kind == "mc":
        choices = " ".join(f"({OPTION_LETTERS[i]}) {name}" for i, name in enumerate(ANSWER_COLOURS))
        problem = f"<image>\nWhat colour is the framed square? {choices}. Answer with the letter."
        solution, verifier = OPTION_LETTERS[ANSWER_COLOURS.index(task.colour)], "mc"
    else:
        problem = "<image>\nWhat colour is the framed square? Answer with the colour's name."
        solution, verifier = task.colour, "exact"
    return {
        "images": [image_name],
        "doc_id": f"{spec.difficulty}-{index:06d}",
        "problem": problem,
        "solution": solution,
        "data_source": f"{DATA_SOURCE}_{spec.difficulty}",
        "verifier": verifier,
        "target_bbox": [round(v, 6) for v in task.box],
        "difficulty": spec.difficulty,
        "question_kind": kind,
        "colour": task.colour,
    }


def write_visual_search_dataset(
    out_dir: str | Path, num_samples: int, *, seed: int = 0, spec: VisualSearchSpec = VisualSearchSpec(),
    name: str = "visual_search", difficulties: tuple[str, ...] | None = None,
) -> Path:
    """Write `num_samples` tasks (images under out_dir/images, rows in out_dir/<name>.json). With
    `difficulties`, the rows cycle through them (overriding spec.difficulty)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_samples):
        row_spec = replace(spec, difficulty=difficulties[index % len(difficulties)]) if difficulties else spec
        task = draw_task(rng, row_spec)
        image_name = f"images/{name}_{index:06d}.png"
        task.image.save(out_dir / image_name)
        rows.append(question_row(rng, index, image_name, task, row_spec))
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return json_path


@dataclass(frozen=True)
class Readability:
    inside: bool
    full_px: float  # the target's side in the full image as the model sees it
    crop_px: float  # ... and in the crop `crop_box` as the model sees it


def check_readability(
    image_size: tuple[int, int], box: tuple[float, float, float, float], crop_box: tuple[float, float, float, float],
    model_size: callable,
) -> Readability:
    """The target's size as the model sees it, in the full image and in a crop (relative boxes);
    `model_size(width, height) -> (width, height)` is the rollout's resize of an image (AgentLoop.model_image's
    arithmetic: data.min/max_pixels, then the processor's)."""
    width, height = image_size
    inside = 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
    target_w = (box[2] - box[0]) * width
    full_w, _ = model_size(width, height)
    crop_w_px = (crop_box[2] - crop_box[0]) * width
    crop_h_px = (crop_box[3] - crop_box[1]) * height
    crop_model_w, _ = model_size(max(1, int(crop_w_px)), max(1, int(crop_h_px)))
    return Readability(inside, target_w * full_w / width, target_w * crop_model_w / crop_w_px)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=VisualSearchSpec.width)
    parser.add_argument("--height", type=int, default=VisualSearchSpec.height)
    parser.add_argument("--difficulty", default="easy,medium,hard", help="comma-separated; rows cycle through them")
    parser.add_argument("--question-kinds", default="mc,free", help="comma-separated subset of mc,free")
    parser.add_argument("--name", default="visual_search", help="file stem of the JSON file and images")
    args = parser.parse_args()
    spec = VisualSearchSpec(width=args.width, height=args.height,
                            question_kinds=tuple(args.question_kinds.split(",")))
    path = write_visual_search_dataset(args.out, args.num_samples, seed=args.seed, spec=spec, name=args.name,
                                       difficulties=tuple(args.difficulty.split(",")))
    print(path)


if __name__ == "__main__":
    main()
