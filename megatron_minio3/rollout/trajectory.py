"""The Trajectory record: everything the trainer needs from one multi-turn rollout.

`token_ids` are the prompt ids followed by every generated token exactly as the engine produced it and
the template tokens of the observation/error turns; image pads are expanded to each image's token count.
`loss_mask` is 1 exactly on generated tokens (stop string and EOS included). `rollout_logprobs` holds the
engine's log-prob of each generated token (0.0 elsewhere). The trainer attends `token_ids[:attention_length]`
(a final turn cut off by the length limit is not attended: the sequence ends at the last `<|im_end|>`).
Multimodal RoPE positions follow from `token_ids` and `image_grid_thw` (models/qwen2_5_vl/mrope.py).

Records serialise to JSON lines plus image files (write_trajectories / read_trajectories).
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image

from megatron_minio3.rollout.crop_tool import num_image_tokens
from megatron_minio3.rollout.tokens import image_pad_runs


_ENDS_WITH_ANSWER = re.compile(r"<answer>.*?</answer>\s*$", re.DOTALL)


def ends_with_answer(text: str) -> bool:
    """True when a turn ends with a closed `<answer>...</answer>` (whitespace after it allowed)."""
    return _ENDS_WITH_ANSWER.search(text) is not None


@dataclass
class TurnRecord:
    """One assistant turn and the tool step after it."""

    num_generated_tokens: int
    finish_reason: str  # "stop" (stop string or end-of-turn token) or "length"
    tool_call: bool  # the turn asked for the tool
    tool_error: str | None = None  # error shown to the model when the call failed
    num_appended_tokens: int = 0  # tokens of the observation or error turn appended after this turn
    generate_s: float = 0.0  # from submitting the request to its result
    tool_s: float = 0.0  # parsing, cropping, resizing and tokenizing the tool result
    num_cached_prompt_tokens: int = 0  # of this turn's prompt, found in the engine's prefix cache


@dataclass
class TrajectoryImage:
    """One image of the trajectory: a prompt image or a crop, raw and as the model saw it."""

    raw: Image.Image  # full resolution: the prompt image or the raw crop
    model: Image.Image  # the resized copy the model saw
    grid_thw: tuple[int, int, int]
    origin: str  # "prompt" or "crop"
    path: str | None = None  # prompt image: its file
    source_index: int | None = None  # crop: index of the observation it was cut from
    box: tuple[int, int, int, int] | None = None  # crop: (left, top, right, bottom) in the raw source
    content_id: str = ""  # an id of the model-side pixels (agent_loop.image_content_id), for the engine's caches


@dataclass
class Trajectory:
    uid: str
    sample_index: int
    data_source: str
    question: str
    ground_truth: str
    verifier: str | None
    prompt_length: int
    token_ids: list[int]
    loss_mask: list[int]
    rollout_logprobs: list[float]
    attention_length: int
    images: list[TrajectoryImage]
    turns: list[TurnRecord]
    turn_texts: list[str]  # assistant turn texts (special tokens skipped), in order
    exceed: bool  # a tool call past the turn/image limit or an overflowing context; the run was cut there
    void: bool  # the final turn has no tool call and no closing <answer>...</answer>, or hit the length limit
    truncated: bool  # the final turn hit the length limit
    end_reason: str  # answer | no_answer | length | max_turns | max_images | context
    total_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def num_tool_calls(self) -> int:
        return sum(turn.tool_call for turn in self.turns)

    @property
    def num_tool_errors(self) -> int:
        return sum(turn.tool_error is not None for turn in self.turns)

    @property
    def num_generated_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def image_grid_thw(self) -> list[tuple[int, int, int]]:
        return [image.grid_thw for image in self.images]

    def summary(self) -> TrajectorySummary:
        return TrajectorySummary(
            data_source=self.data_source,
            num_turns=self.num_turns,
            num_tool_calls=self.num_tool_calls,
            num_tool_errors=self.num_tool_errors,
            exceed=self.exceed,
            void=self.void,
            truncated=self.truncated,
            num_generated_tokens=self.num_generated_tokens,
            sequence_length=len(self.token_ids),
            attention_length=self.attention_length,
        )


@dataclass(frozen=True)
class TrajectorySummary:
    """The numbers of a trajectory that metrics and the controller's decisions need: no tokens, no images.
    This is what leaves a rollout worker for the driver (workers/placement.py)."""

    data_source: str
    num_turns: int
    num_tool_calls: int
    num_tool_errors: int
    exceed: bool
    void: bool
    truncated: bool
    num_generated_tokens: int
    sequence_length: int  # len(token_ids)
    attention_length: int  # the tokens the trainer attends


def validate_trajectory(traj: Trajectory, *, image_pad_id: int, merge_size: int = 2) -> None:
    """Raise ValueError when the record breaks an invariant the trainer relies on."""
    problems: list[str] = []
    length = len(traj.token_ids)
    if len(traj.loss_mask) != length or len(traj.rollout_logprobs) != length:
        problems.append(f"lengths differ: {length} ids, {len(traj.loss_mask)} mask, {len(traj.rollout_logprobs)} logprobs")
    if any(traj.loss_mask[: traj.prompt_length]):
        problems.append("loss mask set inside the prompt")
    if sum(traj.loss_mask) != sum(turn.num_generated_tokens for turn in traj.turns):
        problems.append("loss mask does not cover exactly the generated tokens")
    if any(mask and token == image_pad_id for token, mask in zip(traj.token_ids, traj.loss_mask)):
        problems.append("loss mask on an image pad token")
    expected = traj.prompt_length + sum(t.num_generated_tokens + t.num_appended_tokens for t in traj.turns)
    if expected != length:
        problems.append(f"prompt + turns make {expected} tokens, the record has {length}")
    runs = image_pad_runs(traj.token_ids, image_pad_id)
    counts = [num_image_tokens(image.grid_thw, merge_size) for image in traj.images]
    if [run_length for _, run_length in runs] != counts:
        problems.append(f"image pad runs {[n for _, n in runs]} do not match the images' token counts {counts}")
    if not traj.prompt_length <= traj.attention_length <= length:
        problems.append(f"attention_length {traj.attention_length} outside [{traj.prompt_length}, {length}]")
    if traj.attention_length < length and not traj.truncated:
        problems.append("attention_length is shorter than the record but the trajectory is not truncated")
    if traj.truncated and not traj.void:
        problems.append("a truncated trajectory must be void")
    if traj.exceed and traj.void:
        problems.append("exceed (a tool call) and void (no tool call) are exclusive")
    if traj.turns and traj.exceed != traj.turns[-1].tool_call:
        problems.append("the final turn calls the tool exactly when the trajectory exceeded a limit")
    if traj.turns and traj.turn_texts and not traj.turns[-1].tool_call:
        hit_length = traj.turns[-1].finish_reason == "length"
        if traj.truncated != hit_length:
            problems.append("truncated must say whether the final turn hit the length limit")
        if traj.void != (hit_length or not ends_with_answer(traj.turn_texts[-1])):
            problems.append("void must say whether the final turn hit the length limit or lacks a closing answer")
    if len(traj.turn_texts) != len(traj.turns):
        problems.append(f"{len(traj.turn_texts)} turn texts for {len(traj.turns)} turns")
    if problems:
        raise ValueError(f"trajectory {traj.uid}#{traj.sample_index}: " + "; ".join(problems))


_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_name(text: str) -> str:
    return _UNSAFE_CHARS.sub("_", text).strip("_") or "x"


def write_trajectories(
    trajectories: Sequence[Trajectory],
    out_dir: str | Path,
    *,
    file_name: str = "trajectories.jsonl",
    extras: Sequence[dict[str, Any]] | None = None,
    append: bool = False,
    image_tag: str = "",
) -> Path:
    """Write one JSON line per trajectory and its images under out_dir/images.

    A prompt's model-side images are written once per uid and shared by its samples (the raw prompt image
    is referenced by path); each crop is written raw and model-side. `extras[i]` is merged into line i.
    append=True adds to an existing file (a prompt's samples must all be in the same call). `image_tag` prefixes the
    crops' file names, so that calls appending the same uid again (a training dump's later rounds, other rollout
    handles) do not overwrite the crops of an earlier one.
    """
    out_dir = Path(out_dir)
    image_root = out_dir / "images"
    image_root.mkdir(parents=True, exist_ok=True)
    if extras is not None and len(extras) != len(trajectories):
        raise ValueError(f"{len(extras)} extras for {len(trajectories)} trajectories")
    path = out_dir / file_name
    written_prompt_images: set[str] = set()
    with path.open("a" if append else "w", encoding="utf-8") as handle:
        for index, traj in enumerate(trajectories):
            folder = _safe_name(traj.uid)
            (image_root / folder).mkdir(exist_ok=True)
            images = []
            for image_index, image in enumerate(traj.images):
                entry: dict[str, Any] = {
                    "origin": image.origin,
                    "grid_thw": list(image.grid_thw),
                    "path": image.path,
                    "source_index": image.source_index,
                    "box": list(image.box) if image.box else None,
                    "raw_size": list(image.raw.size),  # (width, height): the frame of the boxes cut from it
                }
                if image.origin == "prompt":
                    model_file = f"images/{folder}/prompt_{image_index}_model.png"
                    if model_file not in written_prompt_images:
                        image.model.save(out_dir / model_file)
                        written_prompt_images.add(model_file)
                    entry["raw_file"] = None
                else:
                    stem = f"images/{folder}/{image_tag}s{traj.sample_index}_obs{image_index}"
                    model_file, entry["raw_file"] = f"{stem}_model.png", f"{stem}_raw.png"
                    image.raw.save(out_dir / entry["raw_file"])
                    image.model.save(out_dir / model_file)
                entry["model_file"] = model_file
                images.append(entry)
            record = {
                key: value
                for key, value in asdict(traj).items()
                if key not in ("images", "turns")
            }
            record["turns"] = [asdict(turn) for turn in traj.turns]
            record["images"] = images
            record["num_turns"] = traj.num_turns
            record["num_tool_calls"] = traj.num_tool_calls
            record["num_tool_errors"] = traj.num_tool_errors
            if extras is not None:
                record.update(extras[index])
            handle.write(json.dumps(record) + "\n")
    return path


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def read_trajectories(path: str | Path) -> Iterable[tuple[Trajectory, dict[str, Any]]]:
    """Read back what write_trajectories wrote: (trajectory, the line's extra keys) pairs."""
    path = Path(path)
    base = path.parent
    names = {f.name for f in Trajectory.__dataclass_fields__.values()}
    derived = {"num_turns", "num_tool_calls", "num_tool_errors"}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            images = []
            for entry in record.pop("images"):
                model = _open(base / entry["model_file"])
                if entry["raw_file"] is not None:
                    raw = _open(base / entry["raw_file"])
                else:
                    raw = _open(Path(entry["path"]))
                images.append(
                    TrajectoryImage(
                        raw=raw,
                        model=model,
                        grid_thw=tuple(entry["grid_thw"]),
                        origin=entry["origin"],
                        path=entry["path"],
                        source_index=entry["source_index"],
                        box=tuple(entry["box"]) if entry["box"] else None,
                    )
                )
            turns = [TurnRecord(**turn) for turn in record.pop("turns")]
            fields = {key: record[key] for key in names if key in record and key not in ("images", "turns")}
            extra = {key: value for key, value in record.items() if key not in names and key not in derived}
            yield Trajectory(images=images, turns=turns, **fields), extra
