"""Loop logic of the crop-tool agent loop, driven by a scripted engine (real vLLM runs in
tests/integration/test_rollout_vllm.py). The tokenizer, templates and images are the real ones."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from megatron_minio3.config.data import DataConfig
from megatron_minio3.config.rollout import EvalConfig, RolloutConfig
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.rollout import agent_loop
from megatron_minio3.rollout.agent_loop import (
    AgentLoop,
    GenerationRequest,
    GenerationResult,
    LoopLimits,
    SamplingSettings,
    image_content_id,
    tail_seconds,
)
from megatron_minio3.rollout.crop_tool import image_grid_thw, num_image_tokens
from megatron_minio3.rollout.tokens import expand_image_pads, image_pad_runs
from megatron_minio3.rollout.trajectory import validate_trajectory

ANSWER = "<think>I see it.</think><answer>B</answer>"


def zoom(box=(0.25, 0.25, 0.75, 0.75), source="original_image") -> str:
    return f'<think>zoom</think><grounding>{{"bbox_2d": {json.dumps(list(box))}, "source": "{source}"}}</grounding>'


class ScriptedEngine:
    """Answers each request from a script: script(request, turn_index) -> (text, finish_reason).

    Token ids are the tokenizer's encoding of the text (plus <|im_end|> when a turn ends normally without a
    tool call); the prompt is expanded from the images actually sent, as vLLM would do."""

    def __init__(self, tokenizer, script, delay_s=None):
        self.tokenizer = tokenizer
        self.script = script
        self.delay_s = delay_s or (lambda request, turn: 0.0)
        self.pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.requests: list[GenerationRequest] = []
        self.events: list[tuple[str, str, float]] = []

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        self.requests.append(request)
        turn = int(request.request_id.split("#t")[1].split("#")[0])
        self.events.append(("submit", request.request_id, time.perf_counter()))
        await asyncio.sleep(self.delay_s(request, turn))
        text, finish = self.script(request, turn)
        # what a model writes is text: special-token strings in it are not special tokens
        ids = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert not set(ids) & set(request.banned_token_ids)
        if finish == "stop" and "</grounding>" not in text:
            ids.append(self.im_end_id)
        ids = ids[: request.max_tokens]
        counts = [num_image_tokens(image_grid_thw(image.size)) for image in request.images]
        self.events.append(("done", request.request_id, time.perf_counter()))
        return GenerationResult(
            token_ids=ids,
            logprobs=[-0.25] * len(ids),
            text=text,
            finish_reason=finish,
            prompt_token_ids=expand_image_pads(request.prompt_token_ids, counts, self.pad_id),
        )


@pytest.fixture()
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
    return path


DATA = DataConfig(min_pixels=3136, max_pixels=60_000)


def make_loop(tokenizer, vision, engines, **limit_overrides) -> AgentLoop:
    rollout = RolloutConfig(max_turns=4, max_images=12, max_tokens_per_turn=64, max_total_tokens=4096,
                            context_reserve_tokens=64)
    limits = dataclasses.replace(LoopLimits.for_training(rollout), **limit_overrides)
    loop = AgentLoop.from_config(engines, tokenizer, vision, rollout, DATA)
    loop.limits = limits
    return loop


def prompt_for(path, uid="ds/0") -> Prompt:
    return Prompt(uid=uid, image_paths=(str(path),), question="<image>\nWhat colour?", answer="B",
                  data_source="ds")


def run(loop, prompts, n=1, **kwargs):
    return asyncio.run(loop.run(prompts, n, **kwargs))


def check(traj, tokenizer):
    validate_trajectory(traj, image_pad_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"))


def test_prompts_over_max_prompt_tokens_are_skipped_and_counted(tokenizer, vision, image_file):
    engine = ScriptedEngine(tokenizer, lambda r, t: (ANSWER, "stop"))
    loop = make_loop(tokenizer, vision, [engine])
    length = len(loop._prepare(prompt_for(image_file)).expanded_ids)  # the prompt, image tokens included
    for limit, skipped in ((length, False), (length - 1, True)):
        loop.limits = dataclasses.replace(loop.limits, max_prompt_tokens=limit)
        batch = run(loop, [prompt_for(image_file)], n=2)
        assert [s.reason for s in batch.skipped] == (["prompt_too_long"] if skipped else [])
        assert len(batch.trajectories) == (0 if skipped else 2)
    assert f"{length} prompt tokens, more than rollout.max_prompt_tokens = {length - 1}" in batch.skipped[0].detail
    assert batch.metrics()["rollout/skipped_prompt_too_long"] == 1.0


def test_direct_answer(tokenizer, vision, image_file):
    engine = ScriptedEngine(tokenizer, lambda r, t: (ANSWER, "stop"))
    batch = run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)], n=3)
    assert len(batch.trajectories) == 3 and not batch.skipped
    for sample, traj in enumerate(batch.trajectories):
        check(traj, tokenizer)
        assert traj.sample_index == sample and traj.num_turns == 1
        assert not (traj.exceed or traj.void or traj.truncated) and traj.end_reason == "answer"
        generated = traj.token_ids[traj.prompt_length:]
        assert generated == tokenizer.encode(ANSWER, add_special_tokens=False) + [engine.im_end_id]
        assert traj.loss_mask == [0] * traj.prompt_length + [1] * len(generated)
        assert traj.rollout_logprobs[traj.prompt_length:] == [-0.25] * len(generated)
        assert traj.attention_length == len(traj.token_ids)
    # the first prompt: chat template, one image expanded to its token count
    text = tokenizer.decode(batch.trajectories[0].token_ids[: batch.trajectories[0].prompt_length])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n") and "What colour?" in text


def test_zoom_then_answer_appends_observation_tokens(tokenizer, vision, image_file):
    script = lambda r, t: (zoom((0.1, 0.2, 0.6, 0.9)), "stop") if t == 0 else (ANSWER, "stop")
    engine = ScriptedEngine(tokenizer, script)
    (traj,) = run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)]).trajectories
    check(traj, tokenizer)
    assert traj.num_turns == 2 and traj.num_tool_calls == 1 and traj.num_tool_errors == 0
    assert not traj.exceed and not traj.void and traj.end_reason == "answer"
    crop = traj.images[1]
    assert crop.origin == "crop" and crop.source_index == 0
    assert crop.box == (40, 60, 240, 270) and crop.raw.size == (200, 210)  # raw pixels of the 400x300 original
    expected = np.asarray(Image.open(image_file).convert("RGB"))[60:270, 40:240]
    assert np.array_equal(np.asarray(crop.raw), expected)
    assert crop.model.width % 28 == 0 and crop.model.height % 28 == 0
    # the appended user turn is exactly the configured template, as tokens, with the crop's pads
    first = traj.turns[0]
    start = traj.prompt_length + first.num_generated_tokens
    appended = traj.token_ids[start : start + first.num_appended_tokens]
    text = tokenizer.decode(appended)
    assert text.startswith("<|im_end|>\n<|im_start|>user\nAfter the above Action 0, here is the the zoom-in image (Observation 1):")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert appended.count(engine.pad_id) == num_image_tokens(crop.grid_thw)
    assert not any(traj.loss_mask[start : start + first.num_appended_tokens])
    # the second request carried the whole context, both images, one pad per image
    second = engine.requests[1]
    assert len(second.images) == 2 and second.prompt_token_ids.count(engine.pad_id) == 2


def test_zoom_into_an_observation(tokenizer, vision, image_file):
    script = lambda r, t: [zoom((0.5, 0.5, 1.0, 1.0)), zoom((0.0, 0.0, 0.5, 0.5), "observation_1"), ANSWER][t]
    engine = ScriptedEngine(tokenizer, lambda r, t: (script(r, t), "stop"))
    (traj,) = run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)]).trajectories
    check(traj, tokenizer)
    assert [image.source_index for image in traj.images[1:]] == [0, 1]
    assert traj.images[1].raw.size == (199, 149) and traj.images[2].raw.size == (99, 74)
    original = np.asarray(Image.open(image_file).convert("RGB"))
    assert np.array_equal(np.asarray(traj.images[2].raw), original[150:224, 200:299])
    assert "Observation 2" in tokenizer.decode(traj.token_ids)


@pytest.mark.parametrize(
    "bad_turn, message",
    [
        ('<grounding>{"bbox_2d": [0.1, 0.2, 0.3], "source": "original_image"}</grounding>', "four numbers"),
        ("<grounding>{bbox_2d: [0, 0, 1, 1]}</grounding>", "not valid JSON"),
        (zoom(source="observation_7"), "observation_7 does not exist"),
        (zoom((0.8, 0.1, 0.2, 0.9)), "x1 > x0"),
        ('<grounding>{"bbox_2d": "<|image_pad|><|im_end|>", "source": "original_image"}</grounding>', "four numbers"),
        # what would escape as OverflowError / ValueError / RecursionError from a plain parser
        ('<grounding>{"bbox_2d": [0, 0, %s, 1], "source": "original_image"}</grounding>' % ("9" * 400), "four finite numbers"),
        ('<grounding>{"bbox_2d": [0.5, 0, -1e308, 1], "source": "original_image"}</grounding>', "x1 > x0"),
        ('<grounding>{"bbox_2d": [0, 0, %s, 1], "source": "original_image"}</grounding>' % ("9" * 5000), "characters long"),
        ("<grounding>" + "[" * 2000 + "]" * 2000 + "</grounding>", "nested too deeply"),
        ("<grounding>" + "[" * 100_000 + "]" * 100_000 + "</grounding>", "characters long"),
        ('<grounding>{"bbox_2d": [0, 0, 1, 1], "source": "observation_\u0663"}</grounding>', "source must be"),
        ('<grounding>{"bbox_2d": [0, 0, 1, 1], "source": "original_image", "\\ud800": 1}</grounding>', "unexpected key"),
    ],
)
def test_bad_call_becomes_an_error_turn(tokenizer, vision, image_file, bad_turn, message):
    engine = ScriptedEngine(tokenizer, lambda r, t: (bad_turn, "stop") if t == 0 else (ANSWER, "stop"))
    (traj,) = run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)]).trajectories
    check(traj, tokenizer)  # in particular: no stray image pad from the quoted model text
    assert traj.num_turns == 2 and traj.num_tool_calls == 1 and traj.num_tool_errors == 1
    assert message in traj.turns[0].tool_error
    assert len(traj.images) == 1 and traj.end_reason == "answer"
    text = tokenizer.decode(traj.token_ids[traj.prompt_length:], skip_special_tokens=False)
    assert f"ERROR occurs during grounding. Error Information: {traj.turns[0].tool_error}." in text


def test_tool_call_on_the_last_turn_exceeds(tokenizer, vision, image_file):
    engine = ScriptedEngine(tokenizer, lambda r, t: (zoom(), "stop"))
    (traj,) = run(make_loop(tokenizer, vision, [engine], max_turns=3), [prompt_for(image_file)]).trajectories
    check(traj, tokenizer)
    assert traj.num_turns == 3 and traj.exceed and not traj.void and traj.end_reason == "max_turns"
    assert len(traj.images) == 3  # two crops were made, the third call was not executed
    assert traj.turns[-1].num_appended_tokens == 0 and traj.token_ids[-1] != engine.im_end_id


def test_image_limit_exceeds(tokenizer, vision, image_file):
    engine = ScriptedEngine(tokenizer, lambda r, t: (zoom(), "stop"))
    (traj,) = run(make_loop(tokenizer, vision, [engine], max_turns=10, max_images=2), [prompt_for(image_file)]).trajectories
    check(traj, tokenizer)
    assert traj.exceed and traj.end_reason == "max_images" and len(traj.images) == 2 and traj.num_turns == 2


def test_context_overflow_rolls_back_the_observation(tokenizer, vision, image_file):
    engine = ScriptedEngine(tokenizer, lambda r, t: (zoom(), "stop"))
    probe = make_loop(tokenizer, vision, [ScriptedEngine(tokenizer, lambda r, t: (ANSWER, "stop"))])
    prompt_length = run(probe, [prompt_for(image_file)]).trajectories[0].prompt_length
    loop = make_loop(tokenizer, vision, [engine], max_total_tokens=prompt_length + 160, context_reserve_tokens=40)
    (traj,) = run(loop, [prompt_for(image_file)]).trajectories
    check(traj, tokenizer)
    assert traj.exceed and traj.end_reason == "context"
    assert traj.turns[-1].tool_call and traj.turns[-1].num_appended_tokens == 0
    assert len(traj.images) == traj.num_turns  # every executed crop but the rolled-back one is kept
    assert len(traj.token_ids) <= prompt_length + 160 - 40 + traj.turns[-1].num_generated_tokens
    for request in engine.requests:  # no request may ask for more than the remaining budget
        counts = [num_image_tokens(image_grid_thw(image.size)) for image in request.images]
        assert len(expand_image_pads(request.prompt_token_ids, counts, engine.pad_id)) + request.max_tokens <= prompt_length + 160


def test_length_limit_is_void_and_truncated(tokenizer, vision, image_file):
    script = lambda r, t: (zoom(), "stop") if t == 0 else ("<think>" + "very long " * 200, "length")
    engine = ScriptedEngine(tokenizer, script)
    (traj,) = run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)]).trajectories
    check(traj, tokenizer)
    assert traj.void and traj.truncated and not traj.exceed and traj.end_reason == "length"
    assert traj.turns[-1].num_generated_tokens == 64  # max_tokens_per_turn
    # attended up to and including the last <|im_end|> (the end of the observation turn)
    assert traj.token_ids[traj.attention_length - 1] == engine.im_end_id
    assert traj.attention_length == len(traj.token_ids) - 64 - len(tokenizer.encode("\n<|im_start|>assistant\n", add_special_tokens=False))


def test_no_answer_is_void(tokenizer, vision, image_file):
    engine = ScriptedEngine(tokenizer, lambda r, t: ("<think>no idea</think>", "stop"))
    (traj,) = run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)]).trajectories
    check(traj, tokenizer)
    assert traj.void and not traj.truncated and traj.end_reason == "no_answer"
    engine = ScriptedEngine(tokenizer, lambda r, t: ("<answer>B</answer> and more text", "stop"))
    (traj,) = run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)]).trajectories
    assert traj.void  # the final turn must end with the answer


def test_bad_images_skip_their_prompt_and_are_counted(tokenizer, vision, image_file, tmp_path, caplog):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image_file.read_bytes()[:200])
    prompts = [
        prompt_for(tmp_path / "missing.png", uid="ds/missing"),
        prompt_for(corrupt, uid="ds/corrupt"),
        prompt_for(truncated, uid="ds/truncated"),
        prompt_for(image_file, uid="ds/good"),
    ]
    engine = ScriptedEngine(tokenizer, lambda r, t: (ANSWER, "stop"))
    with caplog.at_level("WARNING"):
        batch = run(make_loop(tokenizer, vision, [engine]), prompts, n=2)
    assert [t.uid for t in batch.trajectories] == ["ds/good", "ds/good"]
    assert sorted(s.uid for s in batch.skipped) == ["ds/corrupt", "ds/missing", "ds/truncated"]
    assert {s.reason for s in batch.skipped} == {"image_error"}
    assert batch.metrics()["rollout/skipped_image_error"] == 3.0
    assert sum("skipping prompt" in record.message for record in caplog.records) == 3


def test_oversized_image_is_downscaled(tokenizer, vision, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("RGB", (4000, 3000), (10, 200, 30)).save(path)
    engine = ScriptedEngine(tokenizer, lambda r, t: (zoom((0.0, 0.0, 0.1, 0.1)), "stop") if t == 0 else (ANSWER, "stop"))
    (traj,) = run(make_loop(tokenizer, vision, [engine]), [prompt_for(path)]).trajectories
    check(traj, tokenizer)
    original, crop = traj.images
    assert original.raw.size == (4000, 3000)
    # Mini-o3 scales 4000x3000 down to 60,000 px (282x212), then the processor rounds to multiples of 28
    assert original.model.size == (280, 224)
    assert crop.raw.size == (400, 300)  # the crop is cut from the full-resolution original


def test_trajectories_do_not_wait_for_each_other(tokenizer, vision, image_file):
    """Async chains: the fast trajectory finishes all its turns while the slow one's first turn runs."""
    def script(request, turn):
        return (zoom(), "stop") if turn < 2 else (ANSWER, "stop")

    def delay(request, turn):
        return 1.2 if request.request_id.startswith("ds/slow") and turn == 0 else 0.01

    prompts = [prompt_for(image_file, uid="ds/slow"), prompt_for(image_file, uid="ds/fast")]
    engine = ScriptedEngine(tokenizer, script, delay)
    run(make_loop(tokenizer, vision, [engine]), prompts)
    times = {(kind, rid.split("#")[0], rid.split("#")[2]): at for kind, rid, at in engine.events}
    assert times[("done", "ds/fast", "t2")] < times[("done", "ds/slow", "t0")]

    engine = ScriptedEngine(tokenizer, script, delay)
    run(make_loop(tokenizer, vision, [engine]), prompts, turn_synchronous=True)
    times = {(kind, rid.split("#")[0], rid.split("#")[2]): at for kind, rid, at in engine.events}
    assert times[("submit", "ds/fast", "t1")] >= times[("done", "ds/slow", "t0")]


def test_trajectories_spread_over_engines_and_stick_to_one(tokenizer, vision, image_file):
    script = lambda r, t: (zoom(), "stop") if t == 0 else (ANSWER, "stop")
    engines = [ScriptedEngine(tokenizer, script, lambda r, t: 0.01) for _ in range(2)]
    prompts = [prompt_for(image_file, uid=f"ds/{i}") for i in range(3)]
    batch = run(make_loop(tokenizer, vision, engines), prompts, n=2)
    assert len(batch.trajectories) == 6
    served = [{r.request_id.rsplit("#t", 1)[0] for r in engine.requests} for engine in engines]
    assert len(served[0]) == 3 and len(served[1]) == 3 and not served[0] & served[1]


def test_eval_settings_greedy_for_k1(tokenizer, vision):
    rollout, data = RolloutConfig(max_turns=6), DataConfig()
    loop = AgentLoop.from_config([object()], tokenizer, vision, rollout, data, EvalConfig(k=1))
    assert loop.sampling == SamplingSettings(temperature=0.0, top_p=1.0)
    assert loop.limits.max_turns == 12 and loop.limits.max_images == 12
    loop = AgentLoop.from_config([object()], tokenizer, vision, rollout, data, EvalConfig(k=8, temperature=0.7))
    assert loop.sampling.temperature == 0.7
    loop = AgentLoop.from_config([object()], tokenizer, vision, rollout, data)
    assert loop.limits.max_turns == 6 and loop.sampling.temperature == 1.0


def test_engine_prompt_mismatch_is_an_error(tokenizer, vision, image_file):
    class WrongEngine(ScriptedEngine):
        async def generate(self, request):
            result = await super().generate(request)
            return dataclasses.replace(result, prompt_token_ids=result.prompt_token_ids + [self.pad_id])

    engine = WrongEngine(tokenizer, lambda r, t: (ANSWER, "stop"))
    with pytest.raises(RuntimeError, match="image settings match"):
        run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)])


def test_pad_runs_and_metrics(tokenizer, vision, image_file):
    engine = ScriptedEngine(tokenizer, lambda r, t: (zoom(), "stop") if t == 0 else (ANSWER, "stop"))
    batch = run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)], n=2)
    traj = batch.trajectories[0]
    runs = image_pad_runs(traj.token_ids, engine.pad_id)
    assert [length for _, length in runs] == [num_image_tokens(g) for g in traj.image_grid_thw]
    metrics = batch.metrics()
    assert metrics["rollout/num_trajectories"] == 2 and metrics["rollout/num_turns_mean"] == 2
    assert metrics["rollout/num_tool_calls_mean"] == 1 and metrics["rollout/exceed_rate"] == 0


def test_requests_carry_image_ids_computed_once_and_the_tail_is_measured(tokenizer, vision, image_file):
    """Every request names its images by content id (the engine need not hash them again each turn): the prompt
    image keeps one id across samples and turns, a crop gets its own; later turns are marked as continuing."""
    def script(request, turn):
        return (zoom(), "stop") if turn == 0 else (ANSWER, "stop")

    def delay(request, turn):
        return 0.6 if request.request_id.split("#")[1] == "1" and turn == 1 else 0.01

    engine = ScriptedEngine(tokenizer, script, delay)
    batch = run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)], n=3)
    first = [r for r in engine.requests if "#t0#" in r.request_id]
    second = [r for r in engine.requests if "#t1#" in r.request_id]
    assert len(first) == len(second) == 3 and not any(r.continues for r in first) and all(r.continues for r in second)
    prompt_id = first[0].image_ids[0]
    assert all(r.image_ids == (prompt_id,) for r in first) and prompt_id.startswith("minio3-")
    assert all(len(r.image_ids) == 2 and r.image_ids[0] == prompt_id for r in second)
    traj = batch.trajectories[0]
    assert traj.images[1].content_id == image_content_id(traj.images[1].model) == second[0].image_ids[1]
    # sample 1 of 3 waits 0.6 s in its second turn: the batch's tail is its finish minus the median finish
    assert 0.5 < batch.tail_s < 2.0 and batch.metrics()["rollout/tail_s"] == batch.tail_s


def test_image_content_id_follows_the_pixels():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    assert image_content_id(image) == image_content_id(Image.fromarray(pixels.copy()))
    changed = pixels.copy()
    changed[5, 7, 1] ^= 1
    assert image_content_id(Image.fromarray(changed)) != image_content_id(image)
    assert image_content_id(image.convert("L")) != image_content_id(image)
    assert image_content_id(Image.fromarray(pixels.reshape(30, 20, 3))) != image_content_id(image)  # same bytes


def test_tail_seconds():
    assert tail_seconds([]) == 0.0
    assert tail_seconds([3.0]) == 0.0
    assert tail_seconds([1.0, 2.0, 10.0]) == 8.0
    assert tail_seconds([4.0, 1.0, 2.0, 3.0]) == pytest.approx(1.5)


def test_tool_calls_run_off_the_event_loop(tokenizer, vision, image_file, monkeypatch):
    """The crop, resize and observation tokens of a call are made in the loop's tool pool, never on the event loop
    thread, so a slow tool call does not hold up the other trajectories' results."""
    threads = []
    original = agent_loop._TrajectoryState._run_tool

    def recording(self, text, turn):
        threads.append(threading.current_thread().name)
        return original(self, text, turn)

    monkeypatch.setattr(agent_loop._TrajectoryState, "_run_tool", recording)
    engine = ScriptedEngine(tokenizer, lambda r, t: (zoom(), "stop") if t < 2 else (ANSWER, "stop"))
    batch = run(make_loop(tokenizer, vision, [engine]), [prompt_for(image_file)], n=2)
    assert len(threads) == 4 and all(name.startswith("agent-tool") for name in threads), threads
    assert [t.num_turns for t in batch.trajectories] == [3, 3]


def test_a_complete_group_is_handed_over_while_others_still_generate(tokenizer, vision, image_file):
    """on_group: the fast prompt's group (2 samples) reaches the caller before the slow prompt's first turn is done,
    the slow one's after; skipped prompts get no call; turn-synchronous runs refuse the hook."""
    def script(request, turn):
        return ANSWER, "stop"

    def delay(request, turn):
        return 1.0 if request.request_id.startswith("ds/slow") else 0.01

    prompts = [prompt_for(image_file, uid="ds/slow"), prompt_for(image_file, uid="ds/fast")]
    engine = ScriptedEngine(tokenizer, script, delay)
    handed: list[tuple[int, list[str], float]] = []
    batch = run(make_loop(tokenizer, vision, [engine]), prompts, n=2,
                on_group=lambda index, group: handed.append((index, [t.uid for t in group], time.perf_counter())))
    done = {rid.split("#")[0]: at for kind, rid, at in engine.events if kind == "done"}
    assert [(index, uids) for index, uids, _ in handed] == [(1, ["ds/fast", "ds/fast"]), (0, ["ds/slow", "ds/slow"])]
    assert handed[0][2] < done["ds/slow"] <= handed[1][2]
    assert [t.uid for t in batch.trajectories] == ["ds/slow", "ds/slow", "ds/fast", "ds/fast"]  # prompt order
    with pytest.raises(ValueError, match="on_group and on_trajectory need the asynchronous loop"):
        run(make_loop(tokenizer, vision, [engine]), prompts, turn_synchronous=True, on_group=lambda i, g: None)


def test_on_trajectory_counts_every_sample_and_requests_carry_the_priority(tokenizer, vision, image_file, tmp_path):
    """on_trajectory is called once per sample (a skipped prompt's samples at once), and every request of the run
    carries its priority (the round's index when rounds overlap)."""
    ended = []
    engine = ScriptedEngine(tokenizer, lambda r, t: (zoom(), "stop") if t < 1 else (ANSWER, "stop"))
    prompts = [prompt_for(image_file, uid="ds/a"), prompt_for(tmp_path / "missing.png", uid="ds/missing")]
    batch = run(make_loop(tokenizer, vision, [engine]), prompts, n=3, priority=2,
                on_trajectory=lambda: ended.append(len(ended)))
    assert len(batch.trajectories) == 3 and len(batch.skipped) == 1
    assert len(ended) == 6
    assert len(engine.requests) == 6 and {r.priority for r in engine.requests} == {2}
    with pytest.raises(ValueError, match="on_group and on_trajectory need the asynchronous loop"):
        run(make_loop(tokenizer, vision, [engine]), prompts, turn_synchronous=True, on_trajectory=lambda: None)
