"""SFT data in the rollout's exact layout: an oracle conversation rendered for SFT gives the same token ids, loss
mask and images as the agent loop produces when the model writes the same turns; the loss mask covers exactly
the assistant tokens; the synthetic task and its oracle hold their promises (target readable only in a crop)."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from megatron_minio3.config.data import DataConfig
from megatron_minio3.data.conversation import Conversation, Message, render_conversation
from megatron_minio3.data.minio3_json import read_minio3_json
from megatron_minio3.data.oracle import KINDS, write_oracle_dataset
from megatron_minio3.data.sharegpt import read_sft_files
from megatron_minio3.data.synthetic import (
    ANSWER_COLOURS,
    COLOURS,
    VisualSearchSpec,
    check_readability,
    write_visual_search_dataset,
)
from megatron_minio3.rollout.crop_tool import image_grid_thw, model_side_size, num_image_tokens
from megatron_minio3.rollout.tokens import TurnTokenizer, expand_image_pads
from megatron_minio3.trainer.sft_data import build_sft_samples, expand_image_pads_mask, model_images
from tests.unit.test_agent_loop import ScriptedEngine, make_loop

DATA = DataConfig(min_pixels=12544, max_pixels=37632, system_prompt="",
                  user_template="{question}\nThink, zoom, answer.", observation_template="Observation {observation}: <image>")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    tasks = write_visual_search_dataset(root / "tasks", 24, seed=7, spec=VisualSearchSpec(width=672, height=504),
                                        difficulties=("easy", "medium", "hard"))
    path = write_oracle_dataset(tasks, root / "sft", DATA, seed=3)
    return tasks, path


def test_synthetic_tasks_have_known_answers_and_are_readable_only_in_a_crop(oracle, tmp_path):
    tasks, _ = oracle
    rows = json.loads(tasks.read_text())
    assert {r["difficulty"] for r in rows} == {"easy", "medium", "hard"}
    assert {r["verifier"] for r in rows} == {"mc", "exact"}
    for prompt, row in zip(read_minio3_json(tasks), rows):
        image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(prompt.image_paths[0]).convert("RGB"))
        x0, y0, x1, y1 = row["target_bbox"]
        cx, cy = int((x0 + x1) / 2 * 672), int((y0 + y1) / 2 * 504)
        assert tuple(image[cy, cx]) == COLOURS[row["colour"]]  # the framed square's fill
        assert tuple(image[round(y0 * 504), round(x0 * 672)]) == (10, 10, 10)  # its frame, never covered
        answer = row["solution"]
        assert answer == (row["colour"] if row["question_kind"] == "free" else "ABCD"[ANSWER_COLOURS.index(row["colour"])])

        def size(w, h):
            return model_side_size((w, h), DATA.min_pixels, DATA.max_pixels, 3136, 28 * 28 * 1280)

        side = x1 - x0
        crop = (max(0, x0 - 1.5 * side), max(0, y0 - 1.5 * side), min(1, x1 + 1.5 * side), min(1, y1 + 1.5 * side))
        seen = check_readability((672, 504), tuple(row["target_bbox"]), crop, size)
        assert seen.inside and seen.full_px < 8 and seen.crop_px >= 14, (row["difficulty"], seen)
    again = write_visual_search_dataset(tmp_path / "again", 24, seed=7, spec=VisualSearchSpec(width=672, height=504),
                                        difficulties=("easy", "medium", "hard"))
    assert again.read_text().replace(str(tmp_path / "again"), "") == tasks.read_text().replace(str(tasks.parent), "")


def test_oracle_conversations_render_exactly_as_the_agent_loop_lays_them_out(oracle, tokenizer, vision):
    tasks, path = oracle
    records = json.loads(path.read_text())
    assert {r["kind"] for r in records} == set(KINDS)
    conversations = read_sft_files([path]).conversations
    prompts = {p.uid.split("/")[1]: p for p in read_minio3_json(tasks)}
    turns = TurnTokenizer(tokenizer, DATA)
    samples, left_out = build_sft_samples(conversations, turns, DATA, vision, max_length=4096)
    assert len(samples) == len(records) and not any(left_out.values())
    for record, conv, sample in zip(records, conversations, samples):
        assistant = [m["value"] for m in record["conversations"] if m["from"] == "gpt"]
        engine = ScriptedEngine(tokenizer, lambda request, turn: (assistant[turn], "stop"))
        loop = make_loop(tokenizer, vision, [engine], max_tokens_per_turn=256)
        loop.data_cfg, loop.turns = DATA, turns
        traj = asyncio.run(loop.run([prompts[record["id"]]], 1)).trajectories[0]
        images = model_images(sample, DATA, vision)
        counts = [num_image_tokens(image_grid_thw(im.size), vision.merge_size) for im in images]
        assert expand_image_pads(sample.token_ids, counts, turns.image_pad_id) == traj.token_ids, record["kind"]
        assert expand_image_pads_mask(sample.token_ids, sample.loss_mask, counts, turns.image_pad_id) == traj.loss_mask
        assert [im.tobytes() for im in images] == [im.model.tobytes() for im in traj.images]
        assert sample.length == len(traj.token_ids) and traj.turn_texts[-1] == assistant[-1]


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer):
    turns = TurnTokenizer(tokenizer, DATA)
    conv = Conversation("c/0", (Message("system", "sys"), Message("user", "<image>\nq"), Message("assistant", "zoom <|im_end|>"),
                                Message("user", "Observation 1: <image>"), Message("assistant", "<answer>A</answer>")),
                        images=(), data_source="x")
    ids, mask = render_conversation(turns, conv, [None, None])
    assistant = [turns.encode_plain("zoom <|im_end|>"), turns.encode_plain("<answer>A</answer>") + [turns.im_end_id]]
    masked = [t for t, m in zip(ids, mask) if m]
    assert masked == assistant[0] + assistant[1]  # model text stays text: "<|im_end|>" typed by it is not the token
    first = ids.index(turns.im_end_id) + 1  # after the system message: everything up to the first answer is prompt
    assert not any(mask[:first]) and ids[-1] == turns.im_end_id and mask[-1] == 1
    with pytest.raises(ValueError, match="2 image placeholders for 1 images"):
        render_conversation(turns, conv, [None])


def test_perception_conversations_show_the_final_crop_and_name_its_colour(oracle, tmp_path, tokenizer, vision):
    from megatron_minio3.data.oracle import OracleSpec

    tasks, _ = oracle
    rows = {r["doc_id"]: r for r in json.loads(tasks.read_text())}
    path = write_oracle_dataset(tasks, tmp_path / "sft", DATA, seed=3, spec=OracleSpec(perception_share=1.0))
    trajectories = {r["id"]: r for r in json.loads(path.read_text())}
    perception = json.loads((path.parent / "oracle_perception.json").read_text())
    assert {r["kind"] for r in perception} == {"perception"} and len(perception) == len(trajectories) == len(rows)
    records = list(trajectories.values()) + perception
    for record in perception:
        doc_id = record["id"].removesuffix("-perception")
        assert record["images"] == trajectories[doc_id]["images"][-1:]  # the crop that answered the task
        assert record["conversations"][-1]["value"].endswith(f"<answer>{rows[doc_id]['colour']}</answer>")
    samples, left_out = build_sft_samples(read_sft_files([path, path.parent / "oracle_perception.json"]).conversations, TurnTokenizer(tokenizer, DATA), DATA,
                                          vision, max_length=4096)
    assert len(samples) == len(records) and not any(left_out.values())
