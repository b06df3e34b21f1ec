"""SFT and RL dataset readers: sharegpt JSON/JSONL, dataset_info.json mappings, SFT parquet, RL prompt parquet."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_minio3.data.conversation import Conversation, ImageSource, Message
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.data.parquet import (
    PromptColumns,
    cache_image_bytes,
    data_source_from_filename,
    read_prompt_parquet,
    read_sft_parquet,
)
from megatron_minio3.data.sharegpt import (
    MINIO3_COLDSTART,
    OPENAI_MESSAGES,
    VISION_R1_LLAVA_COT,
    VISION_R1_MULBERRY,
    SharegptMapping,
    dataset_info_file,
    image_format,
    load_dataset_info,
    read_sft_files,
    read_sharegpt,
)

SYSTEM = "You search images with a crop tool."
OBSERVATION = "After the above Action 0, here is the the zoom-in image (Observation 1):\n<image>.\nContinue."


def png_bytes(color=(255, 0, 0), size=(8, 6), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def minio3_chat() -> list[dict]:
    return [
        {"from": "system", "value": SYSTEM},
        {"from": "human", "value": "<image>\nWhat color is the coat?"},
        {"from": "gpt",
         "value": '<think>look</think><grounding>{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}</grounding>'},
        {"from": "human", "value": OBSERVATION},
        {"from": "gpt", "value": "<think>done</think><answer>red</answer>"},
    ]


def expected_minio3_messages() -> tuple[Message, ...]:
    chat = minio3_chat()
    return (Message("system", SYSTEM), Message("user", chat[1]["value"]), Message("assistant", chat[2]["value"]),
            Message("user", OBSERVATION), Message("assistant", chat[4]["value"]))


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ------------------------------------------------------------------------------------------ sharegpt JSON

def test_minio3_json_round_trip_with_relative_images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png_bytes((255, 0, 0)))
    (tmp_path / "img" / "a_crop.png").write_bytes(png_bytes((0, 255, 0), (4, 4)))
    path = write_json(tmp_path / "Mini-o3-Coldstart.json",
                      [{"conversations": minio3_chat(), "images": ["img/a.png", "img/a_crop.png"]}])
    result = read_sharegpt(path, mapping=MINIO3_COLDSTART)
    assert result.skipped == []
    assert result.conversations == [Conversation(
        uid="Mini-o3-Coldstart/0",
        messages=expected_minio3_messages(),
        images=(ImageSource(path=str(tmp_path / "img" / "a.png")),
                ImageSource(path=str(tmp_path / "img" / "a_crop.png"))),
        data_source="sft",
    )]
    first, crop = (image.load() for image in result.conversations[0].images)
    assert first.size == (8, 6) and first.getpixel((0, 0)) == (255, 0, 0) and crop.size == (4, 4)
    # image_dir overrides the file's folder; absolute paths stay as they are
    moved = read_sharegpt(path, mapping=MINIO3_COLDSTART, image_dir="/data/minio3").conversations[0]
    assert moved.images[0].path == "/data/minio3/img/a.png"


def test_jsonl_openai_messages_with_system_column_and_data_source(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "hello"}],
         "images": ["/abs/x.png"], "data_source": "chart"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    mapping = dataclasses.replace(OPENAI_MESSAGES, system="sys")
    convs = read_sharegpt(path, mapping=mapping).conversations
    assert [c.uid for c in convs] == ["chat/0", "chat/1"]
    assert convs[0].images == (ImageSource(path="/abs/x.png"),) and convs[0].data_source == "chart"
    assert convs[1].images == () and convs[1].messages == (Message("user", "q"), Message("assistant", "a"))
    # a system column fills the system turn when the chat has none
    path = write_jsonl(tmp_path / "sys.jsonl", [{**rows[1], "sys": "be brief"}])
    assert read_sharegpt(path, mapping=mapping).conversations[0].messages[0] == Message("system", "be brief")


def test_observation_and_function_tags_map_to_user_and_assistant(tmp_path):
    chat = [{"from": "human", "value": "q"}, {"from": "function_call", "value": "call"},
            {"from": "observation", "value": "result"}, {"from": "gpt", "value": "answer"}]
    path = write_json(tmp_path / "tools.json", [{"conversations": chat}])
    conv = read_sharegpt(path).conversations[0]  # LLaMA-Factory's default tags
    assert [m.role for m in conv.messages] == ["user", "assistant", "user", "assistant"]


def test_vision_r1_presets(tmp_path):
    llava = [{"id": "1", "image": "coco/1.jpg",
              "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]
    conv = read_sharegpt(write_json(tmp_path / "llava.json", llava), mapping=VISION_R1_LLAVA_COT).conversations[0]
    assert conv.images == (ImageSource(path=str(tmp_path / "coco/1.jpg")),)  # a single path, not a list
    mulberry = [{"images": ["m/1.png"],
                 "conversations": [{"from": "user", "value": "<image>Q"}, {"from": "assistant", "value": "A"}]}]
    conv = read_sharegpt(write_json(tmp_path / "mulberry.json", mulberry), mapping=VISION_R1_MULBERRY).conversations[0]
    assert conv.messages == (Message("user", "<image>Q"), Message("assistant", "A"))


def test_json_lines_inside_a_json_file_are_accepted(tmp_path):
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = write_jsonl(tmp_path / "lines.json", [row, row])
    assert [c.uid for c in read_sharegpt(path).conversations] == ["lines/0", "lines/1"]


# ------------------------------------------------------------------------------------------ dataset_info.json

DATASET_INFO = {
    "minio3_coldstart": {
        "file_name": "Mini-o3-Coldstart.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"},
    },
    "vision_r1_llava_cot_full": {
        "file_name": "vision_r1_llava_cot_full.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "image"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    },
    "vision_r1_mulberry_sft_full": {
        "file_name": "vision_r1_mulberry_sft_full.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "images"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "user", "assistant_tag": "assistant"},
    },
    "openai_style": {
        "file_name": "data.json", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"},
    },
    "plain": {"file_name": "plain.json", "formatting": "sharegpt"},
    "alpaca": {"file_name": "alpaca.json"},
    "dpo": {"file_name": "dpo.json", "formatting": "sharegpt", "ranking": True},
    "video": {"file_name": "v.json", "formatting": "sharegpt", "columns": {"videos": "videos"}},
}


@pytest.fixture
def info_path(tmp_path):
    return write_json(tmp_path / "dataset_info.json", DATASET_INFO)


def test_dataset_info_entries_give_the_presets(info_path):
    assert load_dataset_info(info_path, "minio3_coldstart") == MINIO3_COLDSTART
    assert load_dataset_info(info_path, "vision_r1_llava_cot_full") == VISION_R1_LLAVA_COT
    assert load_dataset_info(info_path, "vision_r1_mulberry_sft_full") == VISION_R1_MULBERRY
    assert load_dataset_info(info_path, "openai_style") == OPENAI_MESSAGES
    # no columns/tags blocks: LLaMA-Factory's defaults, and no images column
    assert load_dataset_info(info_path, "plain") == SharegptMapping(images=None)
    assert dataset_info_file(info_path, "minio3_coldstart") == info_path.parent / "Mini-o3-Coldstart.json"


@pytest.mark.parametrize("name, message", [
    ("alpaca", "formatting 'alpaca' is not supported"),
    ("dpo", "preference"),
    ("video", "column 'videos' is not supported"),
    ("missing", "no dataset 'missing'"),
])
def test_dataset_info_errors(info_path, name, message):
    with pytest.raises(ValueError, match=message) as info:
        load_dataset_info(info_path, name)
    assert str(info_path) in str(info.value)


def test_mapping_rejects_clashing_tags():
    with pytest.raises(ValueError, match="user_tag and assistant_tag are both 'x'"):
        SharegptMapping(user_tag="x", assistant_tag="x")


# ------------------------------------------------------------------------------------------ bad rows (JSON)

GOOD = {"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}], "images": ["a.png"]}


def chat(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


BAD_ROWS = [
    ({"images": ["a.png"]}, "missing column 'conversations'"),
    ("a string row", "expected an object, got str"),
    ({**GOOD, "conversations": {"from": "human"}}, "must be a list of messages, got dict"),
    ({**GOOD, "conversations": []}, "has no messages"),
    ({**GOOD, "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]},
     "message 0: 'value' must be a string, got int"),
    ({**GOOD, "conversations": [{"value": "q"}]}, "message 0: no 'from' key"),
    ({**GOOD, "conversations": chat(("human", "<image>q"), ("bot", "a"))}, "message 1: unknown role 'bot'"),
    ({**GOOD, "conversations": [{"from": ["human"], "value": "q"}]}, r"message 0: unknown role \['human'\]"),
    ({**GOOD, "conversations": chat(("human", "<image>q"), ("human", "again"), ("gpt", "a"))}, "must alternate"),
    ({**GOOD, "conversations": chat(("human", "<image>q"), ("gpt", "a"), ("human", "more"))},
     "end with an assistant turn"),
    ({**GOOD, "conversations": chat(("gpt", "<image>hello"), ("human", "q"), ("gpt", "a"))}, "start with a user turn"),
    ({**GOOD, "conversations": chat(("human", "q"), ("system", "late"), ("gpt", "a"))},
     "system message may only come first"),
    ({**GOOD, "images": []}, "1 <image> markers but 0 images"),
    ({**GOOD, "images": ["a.png", "b.png"]}, "1 <image> markers but 2 images"),
    ({**GOOD, "images": [7]}, "column 'images' item 0: expected an image path"),
    ({**GOOD, "images": ["  "]}, "column 'images' item 0: empty image path"),
    ({"conversation": GOOD["conversations"], "images": ["a.png"]},
     "missing column 'conversations'; did you mean 'conversation'"),
    ({**GOOD, "conversations": chat(("human", "<image>q"), ("gpt", "<image>a")), "images": ["a.png", "b.png"]},
     "assistant turn cannot carry an image"),
    ({**GOOD, "data_source": 5}, "column 'data_source' must be a string"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS)
def test_bad_rows_raise_naming_file_and_row(tmp_path, row, message):
    path = write_json(tmp_path / "bad.json", [GOOD, row])
    with pytest.raises(ValueError, match=message) as info:
        read_sharegpt(path)
    assert f"{path} row 1" in str(info.value)


def test_skip_mode_counts_bad_rows_and_logs_once(tmp_path, caplog):
    rows = [GOOD] + [row for row, _ in BAD_ROWS] + [GOOD]
    path = write_json(tmp_path / "mixed.json", rows)
    with caplog.at_level(logging.WARNING, logger="megatron_minio3.data.sharegpt"):
        result = read_sharegpt(path, on_bad_row="skip")
    assert [c.uid for c in result.conversations] == ["mixed/0", f"mixed/{len(rows) - 1}"]
    assert [row for row, _ in result.skipped] == list(range(1, len(BAD_ROWS) + 1))
    assert all(f"{path} row {row}" in reason for row, reason in result.skipped)
    records = [r for r in caplog.records if r.name == "megatron_minio3.data.sharegpt"]
    assert len(records) == 1
    assert f"skipped {len(BAD_ROWS)} of {len(rows)} rows" in records[0].getMessage()
    assert "missing column 'conversations'" in records[0].getMessage()


def test_undecodable_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n{not json\n" + json.dumps(GOOD) + "\n" + "[" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"broken.jsonl row 1 \(line 3\): not valid JSON"):
        read_sharegpt(path)
    result = read_sharegpt(path, on_bad_row="skip")
    assert [c.uid for c in result.conversations] == ["broken/0", "broken/2"]
    assert [row for row, _ in result.skipped] == [1, 3] and "nested too deeply" in result.skipped[1][1]


@pytest.mark.parametrize("name, content, message", [
    ("empty.json", b"", "empty file"),
    ("blank.json", b"  \n", "empty file"),
    ("empty.jsonl", b"", "empty file"),
    ("blank.jsonl", b"\n\n", "no rows"),
    ("nolist.json", b'{"conversations": []}', "expected a JSON list of rows"),
    ("norows.json", b"[]", "no rows"),
    ("invalid.json", b"[{", "not valid JSON"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("latin1.json", '[{"conversations": "caf\u00e9"}]'.encode("latin-1"), r"not UTF-8 text \(line 1, byte 23"),
    ("latin1.jsonl", b"{}\n" + '{"x": "\u00e9"}'.encode("latin-1") + b"\n", r"not UTF-8 text \(line 2, byte 10"),
])
def test_file_errors_name_the_file_even_in_skip_mode(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_sharegpt(path, on_bad_row="skip")
    assert str(path) in str(info.value)


def test_directory_missing_file_and_bad_policy(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        read_sharegpt(tmp_path)
    with pytest.raises(ValueError, match="dataset file not found"):
        read_sharegpt(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="on_bad_row must be"):
        read_sharegpt(tmp_path / "nope.json", on_bad_row="ignore")


# ------------------------------------------------------------------------------------------ SFT parquet

def write_parquet(path: Path, rows: list[dict], row_group_size: int | None = None, schema=None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def test_minio3_coldstart_parquet_with_embedded_images(tmp_path):
    red, green = png_bytes((255, 0, 0)), png_bytes((0, 255, 0), fmt="JPEG")
    rows = [
        # the release keeps the chat as text (a Python literal here) and images in the HF Image struct
        {"conversations": repr(minio3_chat()),
         "images": [{"bytes": red, "path": "root.png"}, {"bytes": green, "path": None}],
         "data_source": "deepeyes_chart"},
        {"conversations": json.dumps(minio3_chat()),
         "images": [{"bytes": None, "path": "rel/c.png"}, {"bytes": red, "path": None}],
         "data_source": None},
    ]
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet", rows)
    result = read_sft_parquet(path, mapping=MINIO3_COLDSTART)
    assert result.conversations == [
        Conversation(uid="train-00000-of-00001/0", messages=expected_minio3_messages(),
                     images=(ImageSource(data=red), ImageSource(data=green)), data_source="deepeyes_chart"),
        Conversation(uid="train-00000-of-00001/1", messages=expected_minio3_messages(),
                     images=(ImageSource(path=str(tmp_path / "rel/c.png")), ImageSource(data=red)), data_source="sft"),
    ]
    loaded = result.conversations[0].images[1].load()
    assert loaded.size == (8, 6) and loaded.getpixel((4, 3))[1] > 200  # the JPEG is green


def test_sft_parquet_plain_bytes_and_paths_columns(tmp_path):
    chat_ = [{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}]
    rows = [{"conversations": chat_, "images": [png_bytes(), png_bytes((1, 2, 3))]}]
    path = write_parquet(tmp_path / "plain.parquet", rows)
    conv = read_sft_parquet(path).conversations[0]
    assert [image.load().getpixel((0, 0)) for image in conv.images] == [(255, 0, 0), (1, 2, 3)]
    path = write_parquet(tmp_path / "paths.parquet", [{"conversations": chat_, "images": ["a.png", "b.png"]}])
    assert read_sft_parquet(path, image_dir="/imgs").conversations[0].images == (
        ImageSource(path="/imgs/a.png"), ImageSource(path="/imgs/b.png"))


def test_parquet_is_read_in_batches(tmp_path, monkeypatch):
    chat_ = [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]
    rows = [{"conversations": chat_, "images": [png_bytes((i, i, i))], "unused": "x" * 100} for i in range(5)]
    path = write_parquet(tmp_path / "five.parquet", rows, row_group_size=2)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    seen = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("columns"))
        for batch in original(self, *args, **kwargs):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    convs = read_sft_parquet(path, batch_size=2).conversations
    assert seen == [["conversations", "images"], 2, 2, 1]  # only the needed columns, 2 rows at a time
    assert [c.images[0].load().getpixel((0, 0)) for c in convs] == [(i, i, i) for i in range(5)]


def test_sft_parquet_errors(tmp_path):
    chat_ = [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]
    path = write_parquet(tmp_path / "bad.parquet", [
        {"conversations": json.dumps(chat_), "images": [png_bytes()]},
        {"conversations": json.dumps(chat_), "images": [b"not an image"]},
        {"conversations": "[{'from': 'human'", "images": []},
    ])
    with pytest.raises(ValueError, match=f"{path} row 1: column 'images' item 0: the bytes are not a recognised image"):
        read_sft_parquet(path)
    result = read_sft_parquet(path, on_bad_row="skip")
    assert len(result.conversations) == 1 and [row for row, _ in result.skipped] == [1, 2]
    assert "not a JSON or Python list of messages" in result.skipped[1][1]
    # whole-file problems raise even in skip mode
    with pytest.raises(ValueError, match=r"no column 'messages' \(the file has \['conversations', 'images'\]\)"):
        read_sft_parquet(path, mapping=OPENAI_MESSAGES, on_bad_row="skip")
    for name, content, message in [("empty.parquet", b"", "empty file"),
                                   ("junk.parquet", b"PAR1 junk", "not a readable parquet")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            read_sft_parquet(tmp_path / name, on_bad_row="skip")
    empty = write_parquet(tmp_path / "norows.parquet", [], schema=pa.schema([("conversations", pa.string())]))
    with pytest.raises(ValueError, match="no rows"):
        read_sft_parquet(empty)


# ------------------------------------------------------------------------------------------ the dispatcher

def test_read_sft_files_dispatches_by_extension(tmp_path):
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    openai_row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    files = [write_json(tmp_path / "a.json", [row]), write_jsonl(tmp_path / "b.jsonl", [openai_row]),
             write_parquet(tmp_path / "c.parquet", [row, row])]
    result = read_sft_files(files, mapping=[SharegptMapping(), OPENAI_MESSAGES, SharegptMapping()])
    assert [c.uid for c in result.conversations] == ["a/0", "b/0", "c/0", "c/1"]
    with pytest.raises(ValueError, match="unknown SFT file type '.csv'"):
        read_sft_files([tmp_path / "d.csv"])
    (tmp_path / "sub").mkdir()
    with pytest.raises(ValueError, match="uid 'a/0' also comes from an earlier file"):
        read_sft_files([files[0], write_json(tmp_path / "sub" / "a.json", [row])])
    with pytest.raises(ValueError, match="2 mappings for 1 files"):
        read_sft_files([files[0]], mapping=[SharegptMapping(), SharegptMapping()])


# ------------------------------------------------------------------------------------------ RL prompt parquet

def vtriune_row(image: bytes, question="<image>\nHow many cars?", truth="3", **extra) -> dict:
    return {"data_source": "counting_clevr", "prompt": [{"role": "user", "content": question}],
            "images": [{"bytes": image, "path": None}], "ability": "counting",
            "reward_model": {"verifier": "mathverify", "ground_truth": truth, "answer": truth},
            "extra_info": {"index": extra.pop("index", 0)}, **extra}


def test_vtriune_parquet_round_trip_and_image_cache(tmp_path, monkeypatch):
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255), fmt="JPEG")
    rows = [vtriune_row(red, index=10), vtriune_row(blue, index=11, truth="5"), vtriune_row(red, index=12)]
    path = write_parquet(tmp_path / "train_counting_clevr_3.parquet", rows)
    prompts = read_prompt_parquet(path).prompts
    cache = tmp_path / "image_cache"
    red_path = str(cache / f"{hashlib.sha256(red).hexdigest()}.png")
    assert prompts[0] == Prompt(uid="train_counting_clevr_3/10", image_paths=(red_path,),
                                question="<image>\nHow many cars?", answer="3", data_source="counting_clevr")
    assert prompts[1].image_paths[0].endswith(".jpg") and prompts[1].answer == "5"
    assert prompts[2].image_paths == (red_path,)  # same bytes, same file
    assert sorted(p.name for p in cache.iterdir()) == sorted({Path(red_path).name,
                                                              Path(prompts[1].image_paths[0]).name})
    assert Image.open(red_path).getpixel((0, 0)) == (255, 0, 0)
    # a second read reuses the cached files without writing
    monkeypatch.setattr(Path, "write_bytes", lambda *a, **k: pytest.fail("the cache was written again"))
    assert read_prompt_parquet(path).prompts == prompts


def test_prompt_parquet_mapping_fallbacks_and_overrides(tmp_path):
    image = png_bytes()
    rows = [{"problem": "<image>Where is the cat?", "image": image, "solution": [1, 2, 30, 40]},
            {"problem": "text only", "image": None, "solution": [5, 6, 7, 8]}]
    path = write_parquet(tmp_path / "test_grounding_refcoco_2.parquet", rows)
    cache = tmp_path / "elsewhere"
    prompts = read_prompt_parquet(path, image_cache_dir=cache).prompts
    assert prompts[0].data_source == "grounding_refcoco"  # derived from the V-Triune file name
    assert prompts[0].answer == "[1, 2, 30, 40]" and prompts[1].answer == "[5, 6, 7, 8]"
    assert prompts[0].image_paths[0].startswith(str(cache)) and prompts[1].image_paths == ()
    assert [p.uid for p in prompts] == ["test_grounding_refcoco_2/0", "test_grounding_refcoco_2/1"]
    # explicit columns, path images relative to image_dir, a verifier column, and a plain file name
    rows = [{"q": "<image>Q", "pics": ["x.png"], "gt": 42, "src": None, "check": "exact", "doc_id": 4}]
    path = write_parquet(tmp_path / "custom.parquet", rows)
    columns = PromptColumns(question="q", images="pics", answer="gt", data_source="src", verifier="check")
    assert read_prompt_parquet(path, columns=columns, image_dir="/imgs").prompts == [
        Prompt(uid="custom/4", image_paths=("/imgs/x.png",), question="<image>Q", answer="42", data_source="custom",
               verifier="exact")]


def test_prompt_parquet_bad_rows(tmp_path):
    image = png_bytes()
    rows = [
        vtriune_row(image, index=0),
        vtriune_row(image, index=0),  # duplicate id
        vtriune_row(image, index=2, question="<image><image> two?"),
        vtriune_row(image, index=3, truth=None),
        {**vtriune_row(image, index=4),
         "prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {**vtriune_row(image, index=5), "images": [{"bytes": b"\x00\x01junk", "path": None}]},
    ]
    path = write_parquet(tmp_path / "train_x_y_6.parquet", rows)
    with pytest.raises(ValueError, match=f"{path} row 1: column 'extra_info.index': id '0' appears twice"):
        read_prompt_parquet(path)
    result = read_prompt_parquet(path, on_bad_row="skip")
    assert [p.uid for p in result.prompts] == ["train_x_y_6/0"]
    reasons = dict(result.skipped)
    assert sorted(reasons) == [1, 2, 3, 4, 5]
    assert "2 <image> markers but the row has 1 images" in reasons[2]
    assert "column 'reward_model.ground_truth' (the answer) is empty" in reasons[3]
    assert "multi-turn prompts are not supported" in reasons[4]
    assert "column 'images' item 0: the bytes are not a recognised image" in reasons[5]
    assert len(list((tmp_path / "image_cache").iterdir())) == 1  # bad rows write nothing
    with pytest.raises(ValueError, match=r"none of the columns \['solution'\] for the answer"):
        read_prompt_parquet(path, columns=PromptColumns(answer="solution"), on_bad_row="skip")


def test_image_helpers(tmp_path):
    assert image_format(png_bytes(fmt="WEBP")) == "webp" and image_format(png_bytes(fmt="JPEG")) == "jpg"
    assert image_format(b"plain text") is None
    with pytest.raises(ValueError, match="not a recognised image"):
        cache_image_bytes(b"plain text", tmp_path)
    assert data_source_from_filename("train_puzzle_puzzlevqa_2648_x2.parquet") == "puzzle_puzzlevqa"
    assert data_source_from_filename("test_detection_coco_test_multi_2000.parquet") == "detection_coco_test_multi"
    assert data_source_from_filename("visualprobe.parquet") is None
