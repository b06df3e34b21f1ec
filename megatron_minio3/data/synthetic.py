"""Synthetic visual-search tasks with known answers, written in the Mini-o3 JSON format.

Each image is a textured background with many distractor discs and squares and one small triangle;
the question asks for the triangle's colour as a 4-way multiple choice (answer: the option letter).
The target is small relative to the image, so a model that can zoom has an advantage. Rows carry the
target's relative box as "target_bbox" (ignored by the reader, handy for checks).

    python -m megatron_minio3.data.synthetic --out DIR --num-samples 64 [--width 896 --height 672]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
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
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
OPTION_LETTERS = "ABCD"


@dataclass(frozen=True)
class VisualSearchSpec:
    width: int = 896
    height: int = 672
    target_fraction: float = 0.03  # triangle side as a fraction of the shorter image side
    num_distractors: int = 40


def draw_task(rng: np.random.Generator, spec: VisualSearchSpec) -> tuple[Image.Image, str, tuple[float, ...]]:
    """One image, the target's colour name and its relative box (x0, y0, x1, y1)."""
    noise = rng.integers(150, 230, size=(spec.height // 8 + 1, spec.width // 8 + 1, 3), dtype=np.uint8)
    background = Image.fromarray(noise, "RGB").resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(background)
    names = list(COLOURS)
    short_side = min(spec.width, spec.height)
    for _ in range(spec.num_distractors):
        size = int(rng.integers(max(4, short_side // 60), max(6, short_side // 12)))
        x = int(rng.integers(0, spec.width - size))
        y = int(rng.integers(0, spec.height - size))
        colour = COLOURS[names[int(rng.integers(len(names)))]]
        if rng.random() < 0.5:
            draw.ellipse((x, y, x + size, y + size), fill=colour)
        else:
            draw.rectangle((x, y, x + size, y + size), fill=colour)
    side = max(6, int(short_side * spec.target_fraction))
    x0 = int(rng.integers(0, spec.width - side))
    y0 = int(rng.integers(0, spec.height - side))
    target_name = names[int(rng.integers(len(names)))]
    draw.polygon([(x0 + side / 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=COLOURS[target_name])
    box = (x0 / spec.width, y0 / spec.height, (x0 + side) / spec.width, (y0 + side) / spec.height)
    return background, target_name, box


def make_row(rng: np.random.Generator, index: int, image_name: str, target_name: str, box) -> dict:
    wrong = [name for name in COLOURS if name != target_name]
    options = [target_name] + [wrong[int(i)] for i in rng.choice(len(wrong), size=3, replace=False)]
    order = rng.permutation(4)
    options = [options[int(i)] for i in order]
    letter = OPTION_LETTERS[options.index(target_name)]
    choices = "\n".join(f"({OPTION_LETTERS[i]}) {name}" for i, name in enumerate(options))
    return {
        "images": [image_name],
        "doc_id": f"{index:06d}",
        "problem": f"<image>\nWhat colour is the small triangle in the image?\n{choices}\n"
        "Answer with the option's letter.",
        "solution": letter,
        "data_source": DATA_SOURCE,
        "target_bbox": [round(v, 6) for v in box],
    }


def write_visual_search_dataset(
    out_dir: str | Path, num_samples: int, *, seed: int = 0, spec: VisualSearchSpec = VisualSearchSpec(),
    name: str = "visual_search",
) -> Path:
    """Write `num_samples` tasks: images under out_dir/images and the rows in out_dir/<name>.json."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_samples):
        image, target_name, box = draw_task(rng, spec)
        image_name = f"images/{name}_{index:06d}.png"
        image.save(out_dir / image_name)
        rows.append(make_row(rng, index, image_name, target_name, box))
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return json_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=VisualSearchSpec.width)
    parser.add_argument("--height", type=int, default=VisualSearchSpec.height)
    parser.add_argument("--name", default="visual_search", help="file stem of the JSON file and images")
    args = parser.parse_args()
    spec = VisualSearchSpec(width=args.width, height=args.height)
    path = write_visual_search_dataset(args.out, args.num_samples, seed=args.seed, spec=spec, name=args.name)
    print(path)


if __name__ == "__main__":
    main()
