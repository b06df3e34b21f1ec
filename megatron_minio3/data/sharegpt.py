"""SFT readers for LLaMA-Factory "sharegpt" datasets (JSON and JSON lines), and the dispatcher over SFT files.

A row holds a list of messages (default column "conversations"), each a dict whose `role_tag` key names the
speaker and whose `content_tag` key holds the text, plus optional images and system prompt columns. Which
columns and tags a dataset uses is a `SharegptMapping`: build one by hand, take a preset below, or read
the entry of an LLaMA-Factory `dataset_info.json` with `load_dataset_info`. Every reader returns a
`ReadResult` of `Conversation`s (data/conversation.py). Bad rows raise a ValueError naming the file and
row, or, with on_bad_row="skip", are left out, listed in `ReadResult.skipped` and logged once per file.
docs/data.md describes the formats, the presets and the rules.
"""
from __future__ import annotations

import ast
import difflib
import io
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from megatron_minio3.data.conversation import Conversation, ImageSource, Message, Role

logger = logging.getLogger(__name__)

OnBadRow = Literal["raise", "skip"]
DEFAULT_SFT_DATA_SOURCE = "sft"


@dataclass(frozen=True)
class SharegptMapping:
    """Where a sharegpt dataset keeps things: column names and message tags (LLaMA-Factory's names).

    A tag set to None is not recognised (a message using it is an error). `data_source` is our addition:
    the column whose value becomes `Conversation.data_source` when present (else "sft")."""

    messages: str = "conversations"
    images: str | None = "images"
    system: str | None = None
    tools: str | None = None
    data_source: str | None = "data_source"
    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    observation_tag: str | None = "observation"
    function_tag: str | None = "function_call"
    system_tag: str | None = "system"

    def __post_init__(self) -> None:
        for name in ("messages", "role_tag", "content_tag", "user_tag", "assistant_tag"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"SharegptMapping.{name} must be a non-empty string, got {value!r}")
        for name in ("images", "system", "tools", "data_source", "observation_tag", "function_tag", "system_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"SharegptMapping.{name} must be a non-empty string or None, got {value!r}")
        tags = {"user_tag": self.user_tag, "assistant_tag": self.assistant_tag, "observation_tag": self.observation_tag,
                "function_tag": self.function_tag, "system_tag": self.system_tag}
        seen: dict[str, str] = {}
        for name, tag in tags.items():
            if tag is None:
                continue
            if tag in seen:
                raise ValueError(f"SharegptMapping: {seen[tag]} and {name} are both {tag!r}")
            seen[tag] = name

    def role_of(self) -> dict[str, Role]:
        """Our role for each recognised tag: tool results (observation) are user turns, function calls
        are assistant turns (rendered as plain assistant text)."""
        roles: dict[str, Role] = {self.user_tag: "user", self.assistant_tag: "assistant"}
        if self.observation_tag is not None:
            roles[self.observation_tag] = "user"
        if self.function_tag is not None:
            roles[self.function_tag] = "assistant"
        if self.system_tag is not None:
            roles[self.system_tag] = "system"
        return roles


# The dataset_info.json entries published with the recipes we reproduce, as LLaMA-Factory reads them
# (a "tags" block that omits a tag leaves that tag unset). docs/data.md shows the JSON of each.
MINIO3_COLDSTART = SharegptMapping(
    messages="conversations", images="images",
    role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt", system_tag="system",
    observation_tag=None, function_tag=None,
)
VISION_R1_LLAVA_COT = SharegptMapping(
    messages="conversations", images="image",
    role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt",
    observation_tag=None, function_tag=None, system_tag=None,
)
VISION_R1_MULBERRY = SharegptMapping(
    messages="conversations", images="images",
    role_tag="from", content_tag="value", user_tag="user", assistant_tag="assistant",
    observation_tag=None, function_tag=None, system_tag=None,
)
OPENAI_MESSAGES = SharegptMapping(
    messages="messages", images="images",
    role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant", system_tag="system",
    observation_tag=None, function_tag=None,
)


@dataclass
class ReadResult:
    """The conversations read, in file order, and the rows left out in skip mode as (row, reason);
    the reason names the file and row."""

    conversations: list[Conversation] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- dataset_info.json

_COLUMN_KEYS = ("messages", "images", "system", "tools")
_UNSUPPORTED_COLUMNS = ("videos", "audios", "chosen", "rejected", "kto_tag")
_REQUIRED_TAGS = ("role_tag", "content_tag", "user_tag", "assistant_tag")
_OPTIONAL_TAGS = ("observation_tag", "function_tag", "system_tag")


def _dataset_info_entry(path: str | Path, name: str) -> dict[str, Any]:
    path = Path(path)
    check_data_file(path)
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object of dataset entries, got {type(info).__name__}")
    if name not in info:
        raise ValueError(f"{path}: no dataset {name!r}; the file has {sorted(info)}")
    entry = info[name]
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: dataset {name!r} must be an object, got {type(entry).__name__}")
    return entry


def load_dataset_info(path: str | Path, name: str) -> SharegptMapping:
    """The mapping of dataset `name` in an LLaMA-Factory dataset_info.json.

    LLaMA-Factory's rules: "formatting" must be "sharegpt" (its default is "alpaca"); without a "columns"
    block the messages are in "conversations" and there are no images or system column; without a "tags"
    block the tags are from/value/human/gpt/observation/function_call/system. A block that is present
    sets each of its keys and leaves the keys it omits unset (None), with one deviation: an omitted
    messages column, role_tag, content_tag, user_tag or assistant_tag keeps its default here, where
    LLaMA-Factory would reject every row."""
    where = f"{path}: dataset {name!r}"
    entry = _dataset_info_entry(path, name)
    formatting = entry.get("formatting", "alpaca")
    if formatting != "sharegpt":
        raise ValueError(f"{where}: formatting {formatting!r} is not supported; only 'sharegpt' is")
    if entry.get("ranking"):
        raise ValueError(f"{where}: preference (ranking) datasets are not SFT data")
    kwargs: dict[str, Any] = {"images": None, "system": None, "tools": None}
    columns = entry.get("columns")
    if columns is not None:
        if not isinstance(columns, dict):
            raise ValueError(f"{where}: 'columns' must be an object")
        for key in _UNSUPPORTED_COLUMNS:
            if columns.get(key):
                raise ValueError(f"{where}: column {key!r} is not supported by the SFT readers")
        for key in _COLUMN_KEYS:
            if columns.get(key) is not None:
                kwargs[key] = columns[key]
    tags = entry.get("tags")
    if tags is not None:
        if not isinstance(tags, dict):
            raise ValueError(f"{where}: 'tags' must be an object")
        for key in _REQUIRED_TAGS:
            if tags.get(key) is not None:
                kwargs[key] = tags[key]
        for key in _OPTIONAL_TAGS:
            kwargs[key] = tags.get(key)
    try:
        return SharegptMapping(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def dataset_info_file(path: str | Path, name: str) -> Path:
    """The data file of entry `name` ("file_name", relative to the dataset_info.json's folder)."""
    entry = _dataset_info_entry(path, name)
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(f"{path}: dataset {name!r} has no local 'file_name' (hub datasets are not read here)")
    return Path(path).parent / file_name


# ------------------------------------------------------------------------------------------ row conversion

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"BM", "bmp"),
)


def image_format(data: bytes) -> str | None:
    """The file extension (no dot) for encoded image bytes, from their header; None if not an image.
    Only the header is read (the magic numbers, else PIL's lazy open), never the pixels."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except Exception:  # noqa: BLE001 - any failure to identify the header means "not an image"
        return None
    return {"JPEG": "jpg"}.get(fmt, fmt.lower()) if fmt else None


def _image_item(item: Any, column: str, index: int, where: str, image_dir: Path) -> ImageSource:
    what = f"{where}: column {column!r} item {index}"
    if isinstance(item, dict):  # the Hugging Face datasets Image layout {"bytes": ..., "path": ...}
        data, path = item.get("bytes"), item.get("path")
        if data is not None:
            item = data
        elif path is not None:
            item = path
        else:
            raise ValueError(f"{what}: an image struct with neither bytes nor path")
    if isinstance(item, (bytes, bytearray)):
        if image_format(bytes(item)) is None:
            raise ValueError(f"{what}: the bytes are not a recognised image (they start with {bytes(item[:8])!r})")
        return ImageSource(data=bytes(item))
    if isinstance(item, str):
        if not item.strip():
            raise ValueError(f"{what}: empty image path")
        return ImageSource(path=str(image_dir / item))
    raise ValueError(f"{what}: expected an image path, bytes or a {{bytes, path}} struct, got {type(item).__name__}")


def image_sources_from_value(value: Any, column: str, where: str, image_dir: Path) -> tuple[ImageSource, ...]:
    """The images of one cell: None (no images), one item, or a list of items; an item is a path (relative
    ones are joined to image_dir), encoded bytes (header checked), or a {bytes, path} struct (bytes win)."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    return tuple(_image_item(item, column, index, where, image_dir) for index, item in enumerate(items))


def _parse_messages(value: Any, column: str, where: str) -> list[Any]:
    if value is None:
        raise ValueError(f"{where}: missing column {column!r}")
    if isinstance(value, str):  # some parquet releases keep the chat as text (JSON, or a Python literal)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                raise ValueError(f"{where}: column {column!r} is text but not a JSON or Python list "
                                 f"of messages") from None
    if not isinstance(value, list):
        raise ValueError(f"{where}: column {column!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{where}: column {column!r} has no messages")
    return value


def _optional_text(row: Mapping[str, Any], column: str | None, where: str) -> str | None:
    if column is None:
        return None
    value = row.get(column)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: column {column!r} must be a string, got {type(value).__name__}")
    return value


def conversation_from_row(row: Any, *, mapping: SharegptMapping, uid: str, where: str,
                          image_dir: str | Path) -> Conversation:
    """One dataset row as a validated Conversation; ValueError naming `where` (file and row) and the
    column or message at fault. Tool results and function calls become user and assistant turns."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
    if mapping.messages not in row:
        close = difflib.get_close_matches(mapping.messages, [k for k in row if isinstance(k, str)], n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}? (set SharegptMapping.messages)" if close else ""
        raise ValueError(f"{where}: missing column {mapping.messages!r}{hint}")
    raw = _parse_messages(row.get(mapping.messages), mapping.messages, where)
    tools = row.get(mapping.tools) if mapping.tools else None
    if tools not in (None, "", "[]", []):
        raise ValueError(f"{where}: column {mapping.tools!r}: tool descriptions are not supported by the SFT renderer")
    roles = mapping.role_of()
    parsed: list[Message] = []
    for index, message in enumerate(raw):
        what = f"{where}: column {mapping.messages!r} message {index}"
        if not isinstance(message, Mapping):
            raise ValueError(f"{what}: expected an object, got {type(message).__name__}")
        if mapping.role_tag not in message:
            raise ValueError(f"{what}: no {mapping.role_tag!r} key")
        if mapping.content_tag not in message:
            raise ValueError(f"{what}: no {mapping.content_tag!r} key")
        tag, content = message[mapping.role_tag], message[mapping.content_tag]
        if not isinstance(tag, str) or tag not in roles:
            raise ValueError(f"{what}: unknown role {tag!r}; this mapping knows {sorted(roles)}")
        if not isinstance(content, str):
            raise ValueError(f"{what}: {mapping.content_tag!r} must be a string, got {type(content).__name__}")
        role = roles[tag]
        if role == "system" and index != 0:
            raise ValueError(f"{what}: a system message may only come first")
        parsed.append(Message(role, content))
    if parsed[0].role == "system":  # a leading system message overrides the system column (LLaMA-Factory)
        if not parsed[0].content:
            parsed.pop(0)
    else:
        system = _optional_text(row, mapping.system, where)
        if system is not None:
            parsed.insert(0, Message("system", system))
    images = image_sources_from_value(row.get(mapping.images) if mapping.images else None,
                                      mapping.images or "", where, Path(image_dir))
    data_source = _optional_text(row, mapping.data_source, where) or DEFAULT_SFT_DATA_SOURCE
    conv = Conversation(uid=uid, messages=tuple(parsed), images=images, data_source=data_source)
    conv.validate(where)
    return conv


# ----------------------------------------------------------------------------------------------- file access

def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ("raise", "skip"):
        raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {on_bad_row!r}")


def check_data_file(path: Path) -> None:
    """ValueError naming the file unless it is an existing, non-empty regular file."""
    if not path.exists():
        raise ValueError(f"{path}: dataset file not found")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; give the data files inside it")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")


def report_skipped(path: Path, skipped: list[tuple[int, str]], num_rows: int) -> None:
    """Log once per file: how many rows were skipped and the first reason."""
    if skipped:
        logger.warning("%s: skipped %d of %d rows; the first: %s", path, len(skipped), num_rows, skipped[0][1])


class RowCollector:
    """Applies the on_bad_row policy: raise the row's ValueError, or record it as skipped."""

    def __init__(self, on_bad_row: str):
        check_on_bad_row(on_bad_row)
        self.on_bad_row = on_bad_row
        self.skipped: list[tuple[int, str]] = []

    def bad(self, row: int, exc: ValueError) -> None:
        if self.on_bad_row == "raise":
            raise exc
        self.skipped.append((row, str(exc)))


_Row = tuple[int, str, Any, str | None]  # row index, where, the parsed row (or None), a problem (or None)


def _decode_error(path: Path, data: bytes, exc: UnicodeDecodeError) -> ValueError:
    line = data[: exc.start].count(b"\n") + 1
    return ValueError(f"{path}: not UTF-8 text (line {line}, byte {exc.start}: {exc.reason}); "
                      f"re-encode the file as UTF-8")


def _json_line(path: Path, index: int, lineno: int, line: str) -> _Row:
    """Row `index` from line `lineno` of a JSON-lines file, or the reason it cannot be read."""
    where = f"{path} row {index} (line {lineno})"
    try:
        return index, where, json.loads(line), None
    except json.JSONDecodeError as exc:
        return index, where, None, f"{where}: not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return index, where, None, f"{where}: nested too deeply to read"


def _json_lines(path: Path, text: str) -> Iterator[_Row]:
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield _json_line(path, index, lineno, line)
            index += 1


def _read_error(path: Path, exc: OSError) -> ValueError:
    return ValueError(f"{path}: cannot be read ({exc.strerror or exc})")


def _iter_json(path: Path) -> Iterator[_Row]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _read_error(path, exc) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _decode_error(path, data, exc) from None
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file (Hugging Face's json loader takes both)
            yield from _json_lines(path, text)
            return
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to read") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        yield index, f"{path} row {index}", row, None


def _iter_jsonl(path: Path) -> Iterator[_Row]:
    """JSON lines, read line by line (the file is never held whole)."""
    index, offset = 0, 0
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise _read_error(path, exc) from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not UTF-8 text (line {lineno}, byte {offset + exc.start}: {exc.reason}); "
                                 f"re-encode the file as UTF-8") from None
            offset += len(raw)
            if line.strip():
                yield _json_line(path, index, lineno, line)
                index += 1


def read_sharegpt(path: str | Path, *, mapping: SharegptMapping = SharegptMapping(),
                  image_dir: str | Path | None = None, on_bad_row: OnBadRow = "raise") -> ReadResult:
    """Read a sharegpt .json (a list of rows; JSON lines are accepted too) or .jsonl file.

    Image paths are relative to image_dir (default: the file's folder); images are not opened here.
    Conversation uids are "<file stem>/<row>"."""
    path = Path(path)
    collector = RowCollector(on_bad_row)
    check_data_file(path)
    rows = _iter_jsonl(path) if path.suffix.lower() == ".jsonl" else _iter_json(path)
    base = Path(image_dir) if image_dir is not None else path.parent
    result = ReadResult()
    num_rows = 0
    for index, where, row, problem in rows:
        num_rows += 1
        try:
            if problem is not None:
                raise ValueError(problem)
            result.conversations.append(
                conversation_from_row(row, mapping=mapping, uid=f"{path.stem}/{index}", where=where, image_dir=base))
        except ValueError as exc:
            collector.bad(index, exc)
    if num_rows == 0:
        raise ValueError(f"{path}: no rows")
    result.skipped = collector.skipped
    report_skipped(path, result.skipped, num_rows)
    return result


SFT_SUFFIXES = (".json", ".jsonl", ".parquet")


def read_sft_files(paths: Sequence[str | Path], *,
                   mapping: SharegptMapping | Sequence[SharegptMapping] = SharegptMapping(),
                   image_dir: str | Path | None = None, on_bad_row: OnBadRow = "raise",
                   batch_size: int = 64) -> ReadResult:
    """Read SFT files in order, choosing the reader by extension: .json/.jsonl -> read_sharegpt,
    .parquet -> read_sft_parquet. `mapping` is one for all files or one per file. Raises ValueError when
    two files give the same uid (two files with the same name)."""
    from megatron_minio3.data.parquet import read_sft_parquet

    check_on_bad_row(on_bad_row)
    if isinstance(paths, (str, os.PathLike)):
        raise ValueError(f"read_sft_files takes a list of files, got the single path {paths!r}")
    if isinstance(mapping, SharegptMapping):
        mappings = [mapping] * len(paths)
    else:
        mappings = list(mapping)
        if len(mappings) != len(paths):
            raise ValueError(f"read_sft_files: {len(mappings)} mappings for {len(paths)} files")
    if not paths:
        raise ValueError("read_sft_files: no files given")
    result = ReadResult()
    seen: set[str] = set()
    for path, file_mapping in zip(paths, mappings):
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl"):
            part = read_sharegpt(path, mapping=file_mapping, image_dir=image_dir, on_bad_row=on_bad_row)
        elif suffix == ".parquet":
            part = read_sft_parquet(path, mapping=file_mapping, image_dir=image_dir, on_bad_row=on_bad_row,
                                    batch_size=batch_size)
        else:
            raise ValueError(f"{path}: unknown SFT file type {path.suffix!r}; expected one of {list(SFT_SUFFIXES)}")
        for conv in part.conversations:
            if conv.uid in seen:
                raise ValueError(f"{path}: uid {conv.uid!r} also comes from an earlier file (same file name?)")
            seen.add(conv.uid)
        result.conversations.extend(part.conversations)
        result.skipped.extend(part.skipped)
    return result
