"""Trajectory record: invariant checks that can fail, JSONL + image round trip, token helpers."""
from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from megatron_minio3.config.data import DataConfig
from megatron_minio3.rollout.tokens import TurnTokenizer, expand_image_pads, image_pad_runs
from megatron_minio3.rollout.trajectory import read_trajectories, validate_trajectory, write_trajectories
from tests.unit.test_agent_loop import ANSWER, ScriptedEngine, make_loop, prompt_for, zoom


@pytest.fixture()
def trajectories(tokenizer, vision, tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)).save(path)
    script = lambda r, t: [zoom((0.2, 0.2, 0.7, 0.9)), '<grounding>{"bbox_2d": []}</grounding>', ANSWER][t]
    engine = ScriptedEngine(tokenizer, lambda r, t: (script(r, t), "stop"))
    loop = make_loop(tokenizer, vision, [engine])
    return asyncio.run(loop.run([prompt_for(path, "bench/q 1"), prompt_for(path, "bench/q2")], 2)).trajectories


def test_validate_accepts_loop_output_and_rejects_broken_records(trajectories, tokenizer):
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    traj = trajectories[0]
    validate_trajectory(traj, image_pad_id=pad)
    assert traj.num_turns == 3 and traj.num_tool_calls == 2 and traj.num_tool_errors == 1
    generated_at = traj.prompt_length
    broken = [
        dataclasses.replace(traj, loss_mask=[1] + traj.loss_mask[1:]),  # mask in the prompt
        dataclasses.replace(traj, loss_mask=traj.loss_mask[:-1] + [0]),  # a generated token unmasked
        dataclasses.replace(traj, rollout_logprobs=traj.rollout_logprobs[:-1]),
        dataclasses.replace(traj, images=traj.images[:1]),  # pad runs vs images
        dataclasses.replace(traj, token_ids=traj.token_ids[:generated_at] + [pad] + traj.token_ids[generated_at + 1 :]),
        dataclasses.replace(traj, void=True),  # void although the final turn ends with an answer
        dataclasses.replace(traj, exceed=True),
        dataclasses.replace(traj, attention_length=len(traj.token_ids) - 1),
        dataclasses.replace(traj, turn_texts=traj.turn_texts[:-1]),
    ]
    for record in broken:
        with pytest.raises(ValueError, match="bench/q 1#0"):
            validate_trajectory(record, image_pad_id=pad)


def test_jsonl_round_trip_with_images(trajectories, tmp_path):
    out = tmp_path / "dump"
    extras = [{"score": float(i)} for i in range(len(trajectories))]
    path = write_trajectories(trajectories, out, extras=extras)
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert first["num_turns"] == 3 and first["num_tool_errors"] == 1 and first["score"] == 0.0
    # prompt model images once per uid (shared by samples), crops raw + model per sample
    files = sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png"))
    assert files == sorted(
        [f"images/bench_q_1/prompt_0_model.png", "images/bench_q2/prompt_0_model.png"]
        + [f"images/{uid}/s{s}_obs1_{kind}.png" for uid in ("bench_q_1", "bench_q2") for s in (0, 1) for kind in ("raw", "model")]
    )
    loaded = list(read_trajectories(path))
    assert [extra for _, extra in loaded] == extras
    for (back, _), orig in zip(loaded, trajectories):
        assert back.token_ids == orig.token_ids and back.loss_mask == orig.loss_mask
        assert back.rollout_logprobs == orig.rollout_logprobs and back.turns == orig.turns
        assert (back.exceed, back.void, back.truncated, back.end_reason) == (orig.exceed, orig.void, orig.truncated, orig.end_reason)
        assert back.image_grid_thw == orig.image_grid_thw
        for a, b in zip(back.images, orig.images):
            assert np.array_equal(np.asarray(a.raw), np.asarray(b.raw))
            assert np.array_equal(np.asarray(a.model), np.asarray(b.model))
            assert (a.origin, a.path, a.source_index, a.box) == (b.origin, b.path, b.source_index, b.box)
    with pytest.raises(ValueError, match="extras"):
        write_trajectories(trajectories, out, extras=extras[:1])


def test_pad_helpers():
    assert expand_image_pads([1, 9, 2, 9, 3], [2, 3], 9) == [1, 9, 9, 2, 9, 9, 9, 3]
    assert image_pad_runs([1, 9, 9, 2, 9, 9, 9], 9) == [(1, 2), (4, 3)]
    with pytest.raises(ValueError, match="more image pad tokens"):
        expand_image_pads([9, 9], [1], 9)
    with pytest.raises(ValueError, match="1 image pad tokens for 2 images"):
        expand_image_pads([9], [1, 1], 9)


def test_error_turn_quotes_model_text_as_plain_tokens(tokenizer):
    turns = TurnTokenizer(tokenizer, DataConfig())
    ids = turns.error_ids("got <|image_pad|> and <|im_end|>")
    assert turns.image_pad_id not in ids
    assert ids.count(turns.im_end_id) == 2  # only the turn prefix and suffix
    assert "Error Information: got <|image_pad|> and <|im_end|>." in tokenizer.decode(ids)
    observation = turns.observation_ids(action=0, observation=1)
    assert observation.count(turns.image_pad_id) == 1
    assert observation[observation.index(turns.image_pad_id) - 1] == turns.vision_start_id


def test_turn_tokenizer_is_safe_across_threads(tokenizer):
    """The agent loop prepares prompts in threads while error turns quote model text on the event loop: a plain
    encode must never see the split-special-tokens setting of a concurrent call (HF fast tokenizers share it)."""
    import threading

    turns = TurnTokenizer(tokenizer, DataConfig())
    template = "<|vision_start|><|image_pad|><|vision_end|> where is it?"
    expected = turns.encode(template)
    assert expected.count(turns.image_pad_id) == 1
    stop = threading.Event()

    def quote_model_text():
        while not stop.is_set():
            turns.encode_plain("the model wrote <|image_pad|> here " * 40)

    thread = threading.Thread(target=quote_model_text)
    thread.start()
    try:
        results = [turns.encode(template) for _ in range(20000)]
    finally:
        stop.set()
        thread.join()
    assert all(ids == expected for ids in results)


def test_turn_tokenizer_is_safe_against_other_users_of_the_tokenizer(tokenizer):
    """Another user of the same tokenizer object (an engine quoting text with split_special_tokens, without any
    lock of ours) cannot make the turn tokenizer split <|image_pad|> into text: it encodes with a private copy."""
    import threading

    turns = TurnTokenizer(tokenizer, DataConfig())
    expected = turns.observation_ids(action=0, observation=1)
    assert expected.count(turns.image_pad_id) == 1
    stop = threading.Event()

    def foreign_user():
        while not stop.is_set():
            tokenizer.encode("the model wrote <|image_pad|> here " * 400, add_special_tokens=False,
                             split_special_tokens=True)

    thread = threading.Thread(target=foreign_user)
    thread.start()
    try:
        results = [turns.observation_ids(action=0, observation=1) for _ in range(5000)]
    finally:
        stop.set()
        thread.join()
    assert all(ids == expected for ids in results)
