"""Parquet readers: SFT conversations (the Mini-o3 cold-start release) and RL prompts (V-Triune style).

Both stream the file: only the needed columns are read, `batch_size` rows at a time, so a multi-GB file is
never materialised as one Arrow table. Images may be embedded (encoded bytes, alone or in the Hugging Face
datasets Image struct {"bytes", "path"}) or be paths relative to image_dir (default: the file's folder).

- `read_sft_parquet` returns Conversations whose embedded images stay bytes (ImageSource(data=...)): only
  their header is checked here, decoding is left to ImageSource.load().
- `read_prompt_parquet` returns the rollout's `Prompt`s, whose images must be paths: embedded bytes are
  written once to a content-addressed cache (`<sha256>.<ext>`), by default `image_cache/` next to the file.

docs/data.md describes the column mappings, the cache and the bad-row rules.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from megatron_minio3.data.conversation import ImageSource
from megatron_minio3.config.data import IMAGE_MARKER
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.data.sharegpt import (
    OnBadRow,
    ReadResult,
    RowCollector,
    SharegptMapping,
    check_data_file,
    conversation_from_row,
    image_format,
    image_sources_from_value,
    report_skipped,
)

DEFAULT_BATCH_SIZE = 64  # rows per Arrow batch: image rows are large, keep batches small
IMAGE_CACHE_DIR_NAME = "image_cache"


# --------------------------------------------------------------------------------------------- file access

def _open_parquet(path: Path, batch_size: int) -> pq.ParquetFile:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_data_file(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable parquet file ({exc})") from None
    if parquet.metadata.num_rows == 0:
        raise ValueError(f"{path}: no rows")
    return parquet


def _iter_rows(path: Path, parquet: pq.ParquetFile, columns: list[str], batch_size: int) -> Iterator[tuple[int, dict]]:
    """(row index, row as a dict of Python values) for the given top-level columns, batch by batch."""
    index = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    except (pa.ArrowException, OSError) as exc:  # a corrupt page: the rest of the file cannot be trusted
        raise ValueError(f"{path}: cannot read past row {index} ({exc})") from None


# ------------------------------------------------------------------------------------------------------ SFT

def read_sft_parquet(path: str | Path, *, mapping: SharegptMapping = SharegptMapping(),
                     image_dir: str | Path | None = None, on_bad_row: OnBadRow = "raise",
                     batch_size: int = DEFAULT_BATCH_SIZE) -> ReadResult:
    """Read sharegpt-style SFT rows from parquet (the Mini-o3 cold-start layout: a "conversations" column,
    as a list of messages or as its text, and an "images" column). Uids are "<file stem>/<row>".

    A messages column absent from the file is an error for the whole file (even in skip mode); absent
    optional columns (images, system, data_source) read as empty. The result holds the encoded image
    bytes (about the file's size), never decoded pixels."""
    path = Path(path)
    collector = RowCollector(on_bad_row)
    parquet = _open_parquet(path, batch_size)
    names = parquet.schema_arrow.names
    if mapping.messages not in names:
        raise ValueError(f"{path}: no column {mapping.messages!r} (the file has {names}); set SharegptMapping.messages")
    wanted = [mapping.messages, mapping.images, mapping.system, mapping.tools, mapping.data_source]
    columns = [name for name in dict.fromkeys(wanted) if name is not None and name in names]
    base = Path(image_dir) if image_dir is not None else path.parent
    result = ReadResult()
    num_rows = 0
    for index, row in _iter_rows(path, parquet, columns, batch_size):
        num_rows += 1
        try:
            result.conversations.append(conversation_from_row(
                row, mapping=mapping, uid=f"{path.stem}/{index}", where=f"{path} row {index}", image_dir=base))
        except ValueError as exc:
            collector.bad(index, exc)
    result.skipped = collector.skipped
    report_skipped(path, result.skipped, num_rows)
    return result


# --------------------------------------------------------------------------------------------- image cache

def cache_image_bytes(data: bytes, cache_dir: str | Path) -> str:
    """Write encoded image bytes once as `<cache_dir>/<sha256>.<ext>` (ext from the header) and return the
    path. Same bytes, same file: an existing file is reused, never rewritten. The write is atomic (a
    temporary file renamed into place), so ranks reading the same dataset at once do not clash.
    ValueError when the bytes are not an image; OSError naming the folder when it cannot be written."""
    ext = image_format(data)
    if ext is None:
        raise ValueError(f"the bytes are not a recognised image (they start with {data[:8]!r})")
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{hashlib.sha256(data).hexdigest()}.{ext}"
    if target.exists():
        return str(target)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        temporary = cache_dir / f".{target.name}.{os.getpid()}.tmp"
        temporary.write_bytes(data)
        os.replace(temporary, target)
    except OSError as exc:
        raise OSError(f"{cache_dir}: cannot write the image cache ({exc}); pass image_cache_dir= "
                      f"a writable folder") from None
    return str(target)


# ------------------------------------------------------------------------------------------------ RL prompts

def _candidates(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class PromptColumns:
    """Which columns hold each Prompt field. Each field lists candidates, tried in order against the file's
    schema (the first present wins, per file); a dotted name reads a field of a struct column
    ("reward_model.ground_truth"). A plain string is one candidate. The defaults read V-Triune
    (Orsta-Data-47k) files and Mini-o3-style rows."""

    question: tuple[str, ...] = ("prompt", "problem", "question")
    images: tuple[str, ...] = ("images", "image")
    answer: tuple[str, ...] = ("reward_model.ground_truth", "solution", "answer", "ground_truth")
    data_source: tuple[str, ...] = ("data_source",)
    uid: tuple[str, ...] = ("doc_id", "id", "extra_info.index", "index")
    verifier: tuple[str, ...] = ("verifier",)

    def __post_init__(self) -> None:
        for name in ("question", "images", "answer", "data_source", "uid", "verifier"):
            value = _candidates(getattr(self, name))
            if not all(isinstance(item, str) and item for item in value):
                raise ValueError(f"PromptColumns.{name}: column names must be non-empty strings, got {value!r}")
            object.__setattr__(self, name, value)
        for name in ("question", "answer"):
            if not getattr(self, name):
                raise ValueError(f"PromptColumns.{name} needs at least one column name")


@dataclass
class PromptReadResult:
    """The prompts read, in file order, and the rows left out in skip mode as (row, reason)."""

    prompts: list[Prompt] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


_VTRIUNE_NAME = re.compile(r"^(?:train|test|val|validation)_([A-Za-z0-9]+)_(.+)_\d+(?:_x\d+)?$")


def data_source_from_filename(path: str | Path) -> str | None:
    """"<task>_<source>" from a V-Triune file name `{split}_{task}_{source}_{num}.parquet` (a trailing
    `_x<k>` repeat marker is allowed), e.g. train_chart_chartqapro_498 -> "chart_chartqapro"; else None."""
    match = _VTRIUNE_NAME.match(Path(path).stem)
    return f"{match.group(1)}_{match.group(2)}" if match else None


def _has_column(schema: pa.Schema, dotted: str) -> bool:
    top, *rest = dotted.split(".")
    if top not in schema.names:
        return False
    kind = schema.field(top).type
    for name in rest:
        if not pa.types.is_struct(kind) or kind.get_field_index(name) < 0:
            return False
        kind = kind.field(kind.get_field_index(name)).type
    return True


def _resolve(schema: pa.Schema, candidates: tuple[str, ...]) -> str | None:
    return next((name for name in candidates if _has_column(schema, name)), None)


def _get(row: dict, dotted: str | None) -> Any:
    if dotted is None:
        return None
    top, *rest = dotted.split(".")
    value = row.get(top)
    for name in rest:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _question_text(value: Any, column: str, where: str) -> str:
    """A plain string, or a chat (list of {role, content}): its single user message; system messages
    are dropped (the rollout's own system prompt applies)."""
    if isinstance(value, str):
        return value
    if value is None:
        raise ValueError(f"{where}: column {column!r} is empty")
    if not isinstance(value, list):
        raise ValueError(f"{where}: column {column!r} must be a string or a list of chat messages, "
                         f"got {type(value).__name__}")
    users = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"{where}: column {column!r} message {index} must be an object with a 'role'")
        if message["role"] == "system":
            continue
        if message["role"] != "user":
            raise ValueError(f"{where}: column {column!r} message {index}: role {message['role']!r}; "
                             f"a prompt is one user message (multi-turn prompts are not supported)")
        users.append(message)
    if len(users) != 1:
        raise ValueError(f"{where}: column {column!r} has {len(users)} user messages; a prompt needs exactly one")
    content = users[0].get("content")
    if not isinstance(content, str):
        raise ValueError(f"{where}: column {column!r}: the user message's 'content' must be a string, "
                         f"got {type(content).__name__}")
    return content


def _answer_text(value: Any, column: str, where: str) -> str:
    """Strings as they are, numbers as text, lists and objects (boxes, options) as JSON."""
    if value is None:
        raise ValueError(f"{where}: column {column!r} (the answer) is empty")
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or isinstance(value, (bytes, bytearray)):
        raise ValueError(f"{where}: column {column!r} (the answer) must be text, a number, a list or an object, "
                         f"got {type(value).__name__}")
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    raise ValueError(f"{where}: column {column!r} (the answer) has an unsupported type {type(value).__name__}")


def _optional_str(value: Any, column: str | None, where: str, numbers: bool = False) -> str | None:
    if value is None or value == "":
        return None
    if numbers and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    return value


def read_prompt_parquet(path: str | Path, *, columns: PromptColumns = PromptColumns(),
                        image_dir: str | Path | None = None, image_cache_dir: str | Path | None = None,
                        on_bad_row: OnBadRow = "raise", batch_size: int = DEFAULT_BATCH_SIZE) -> PromptReadResult:
    """Read RL prompts from parquet. Uids are "<file stem>/<uid column value or row index>".

    data_source comes from its column, else (column absent or null) from a V-Triune file name, else the
    file stem. Embedded images are cached by content under image_cache_dir (default:
    `<file folder>/image_cache/`). A question without `<image>` markers is allowed (as in the Mini-o3
    JSON reader); otherwise there must be one marker per image. A required column (question, answer)
    absent from the file is an error for the whole file, even in skip mode."""
    path = Path(path)
    collector = RowCollector(on_bad_row)
    parquet = _open_parquet(path, batch_size)
    schema = parquet.schema_arrow
    chosen: dict[str, str | None] = {}
    for name in ("question", "images", "answer", "data_source", "uid", "verifier"):
        chosen[name] = _resolve(schema, getattr(columns, name))
    for name in ("question", "answer"):
        if chosen[name] is None:
            raise ValueError(f"{path}: none of the columns {list(getattr(columns, name))} for the {name} "
                             f"(the file has {schema.names}); set PromptColumns({name}=...)")
    read = list(dict.fromkeys(dotted.split(".")[0] for dotted in chosen.values() if dotted is not None))
    base = Path(image_dir) if image_dir is not None else path.parent
    cache_dir = Path(image_cache_dir) if image_cache_dir is not None else path.parent / IMAGE_CACHE_DIR_NAME
    fallback_source = data_source_from_filename(path) or path.stem
    result = PromptReadResult()
    seen: set[str] = set()
    num_rows = 0
    for index, row in _iter_rows(path, parquet, read, batch_size):
        num_rows += 1
        where = f"{path} row {index}"
        try:
            question = _question_text(_get(row, chosen["question"]), chosen["question"], where)
            answer = _answer_text(_get(row, chosen["answer"]), chosen["answer"], where)
            image_column = chosen["images"] or ""
            sources = image_sources_from_value(_get(row, chosen["images"]), image_column, where, base)
            num_markers = question.count(IMAGE_MARKER)
            if num_markers not in (0, len(sources)):
                raise ValueError(f"{where}: the question has {num_markers} {IMAGE_MARKER} markers "
                                 f"but the row has {len(sources)} images")
            data_source = (_optional_str(_get(row, chosen["data_source"]), chosen["data_source"], where)
                           or fallback_source)
            doc_id = _optional_str(_get(row, chosen["uid"]), chosen["uid"], where, numbers=True) or str(index)
            verifier = _optional_str(_get(row, chosen["verifier"]), chosen["verifier"], where)
            uid = f"{path.stem}/{doc_id}"
            if uid in seen:
                raise ValueError(f"{where}: column {chosen['uid']!r}: id {doc_id!r} appears twice in the file")
            image_paths = tuple(_image_path(source, cache_dir) for source in sources)
        except ValueError as exc:
            collector.bad(index, exc)
            continue
        seen.add(uid)
        result.prompts.append(Prompt(uid=uid, image_paths=image_paths, question=question, answer=answer,
                                     data_source=data_source, verifier=verifier))
    result.skipped = collector.skipped
    report_skipped(path, result.skipped, num_rows)
    return result


def _image_path(source: ImageSource, cache_dir: Path) -> str:
    return source.path if source.path is not None else cache_image_bytes(source.data, cache_dir)
