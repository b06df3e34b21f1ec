"""Mini-o3 JSON datasets: a list of {"images": [relpath], "doc_id", "problem", "solution", "data_source"} rows.

Image paths are relative to a base image directory (the JSON file's folder when none is given). Rows may
carry an optional "verifier" name that overrides the data_source -> verifier mapping of the reward stage.
Images are not opened here: the rollout loads them, so a missing or corrupt file skips one sample only.

Every row names its images: a row without the key `images` is an error (a misspelt key would otherwise
turn a visual question into a text-only one); a text-only row says so with `"images": []`.
A file that cannot be read (a directory, not UTF-8, not strict JSON: NaN/Infinity, nesting too deep, a
number too long) raises ValueError naming the file.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_minio3.config.data import IMAGE_MARKER


@dataclass(frozen=True)
class Prompt:
    """One question of a dataset, as the rollout sees it."""

    uid: str  # "<dataset name>/<doc_id>": the file's stem, with parent folders when stems repeat (dataset_names)
    image_paths: tuple[str, ...]  # resolved paths of the prompt's images, in order
    question: str  # the row's problem text, `<image>` markers included
    answer: str  # ground truth ("solution")
    data_source: str
    verifier: str | None = None


def _required_str(row: dict[str, Any], key: str, where: str) -> str:
    if key not in row:
        raise ValueError(f"{where}: missing key {key!r}")
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key in ("solution", "doc_id"):
        return str(value)  # numeric answers and ids are common in benchmark files
    if not isinstance(value, str):
        raise ValueError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _read_json(path: Path) -> Any:
    """The parsed file, or ValueError naming it: strict JSON (no NaN/Infinity), UTF-8 text."""
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a dataset file (give the JSON file inside it)")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: dataset file not found") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                         "save the file as UTF-8") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to read") from None
    except ValueError as exc:  # NaN/Infinity, or an integer past Python's digit limit
        raise ValueError(f"{path}: not valid JSON ({' '.join(str(exc).split())[:200]})") from None


def _row_images(row: dict[str, Any], where: str) -> list[str]:
    if "images" not in row:
        close = difflib.get_close_matches("images", [k for k in row if isinstance(k, str)], n=1, cutoff=0.6)
        hint = f"; did you mean 'images' for {close[0]!r}?" if close else ""
        raise ValueError(f"{where}: missing key 'images'{hint} (a list of image paths; write \"images\": [] "
                         "for a text-only row)")
    images = row["images"]
    if not isinstance(images, list) or not all(isinstance(item, str) for item in images):
        raise ValueError(f"{where}: key 'images' must be a list of relative paths")
    for i, item in enumerate(images):
        if not item.strip():
            raise ValueError(f"{where}: 'images[{i}]' is an empty path")
    return images


def dataset_names(files: list[str | Path]) -> list[str]:
    """The name each file's prompt ids start with: its stem ("train"), or, when several files share a stem (the
    seed's VisualProbe_train/train.json and DeepEyes_train_4K/train.json), as many parent folders as make the
    names differ ("VisualProbe_train/train", "DeepEyes_train_4K/train")."""
    paths = [Path(file).resolve() for file in files]
    depth = [0] * len(paths)

    def name(index: int) -> str:
        path = paths[index].with_suffix("")
        return "/".join(path.parts[len(path.parts) - 1 - depth[index]:])

    while True:
        names = [name(i) for i in range(len(paths))]
        clashing = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clashing and depth[i] + 1 < len(paths[i].parts) - 1]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def read_minio3_json(path: str | Path, image_dir: str | Path | None = None, name: str | None = None, *,
                     check_images: bool = False) -> list[Prompt]:
    """Read one Mini-o3 JSON file; prompt ids are "<name>/<doc_id>" (name: the file's stem by default). Raises
    ValueError naming the file, row and key at fault; with check_images, also the image path of a row whose image
    file does not exist."""
    path = Path(path)
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    base = Path(image_dir) if image_dir else path.parent
    stem = name or path.stem
    prompts: list[Prompt] = []
    seen_uids: set[str] = set()
    for index, row in enumerate(rows):
        where = f"{path} row {index}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        images = _row_images(row, where)
        problem = _required_str(row, "problem", where)
        solution = _required_str(row, "solution", where)
        data_source = _required_str(row, "data_source", where)
        doc_id = _required_str(row, "doc_id", where) if "doc_id" in row else str(index)
        verifier = row.get("verifier")
        if verifier is not None and not isinstance(verifier, str):
            raise ValueError(f"{where}: key 'verifier' must be a string")
        num_markers = problem.count(IMAGE_MARKER)
        if num_markers not in (0, len(images)):
            raise ValueError(
                f"{where}: 'problem' has {num_markers} {IMAGE_MARKER} markers but the row has {len(images)} images"
            )
        if check_images:
            origin = "data.image_dir" if image_dir else "the data file's folder"
            for item in images:
                if not (base / item).is_file():
                    raise ValueError(f"{where}: image {item!r} not found: {base / item} (relative image paths resolve "
                                     f"against {origin}, {base})")
        uid = f"{stem}/{doc_id}"
        if uid in seen_uids:
            raise ValueError(f"{where}: doc_id {doc_id!r} appears twice in the file")
        seen_uids.add(uid)
        prompts.append(
            Prompt(
                uid=uid,
                image_paths=tuple(str(base / item) for item in images),
                question=problem,
                answer=solution,
                data_source=data_source,
                verifier=verifier,
            )
        )
    return prompts


def read_datasets(files: list[str], image_dir: str = "", max_prompts_per_file: int = 0, *,
                  check_images: bool = False) -> list[Prompt]:
    """Read several Mini-o3 JSON files in order; max_prompts_per_file > 0 keeps the first rows of each;
    check_images: every image file must exist (the training run's pre-launch check)."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for file, name in zip(files, dataset_names(files)):
        rows = read_minio3_json(file, image_dir or None, name, check_images=check_images)
        if max_prompts_per_file > 0:
            rows = rows[:max_prompts_per_file]
        for prompt in rows:
            if prompt.uid in seen:
                raise ValueError(f"{file}: uid {prompt.uid!r} also appears in an earlier file (the same file twice?)")
            seen.add(prompt.uid)
        prompts.extend(rows)
    return prompts
