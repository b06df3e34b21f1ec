"""The crop-tool loop on real vLLM CPU with the tiny checkpoint (one engine shared by the module).

The tiny checkpoint has random weights, so free generation never calls the tool; the multi-turn run
constrains each turn with a regex (vLLM structured outputs) to think, then zoom (valid or malformed call,
existing or missing source) or answer. The tokens are still sampled by vLLM; the loop sees real outputs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_minio3.config.data import DataConfig
from megatron_minio3.config.rollout import RolloutConfig
from megatron_minio3.data.minio3_json import read_minio3_json
from megatron_minio3.data.synthetic import VisualSearchSpec, write_visual_search_dataset
from megatron_minio3.models.qwen2_5_vl.mrope import get_rope_index, sequence_position_ids
from megatron_minio3.rollout import agent_loop
from megatron_minio3.rollout.agent_loop import AgentLoop, GenerationRequest, SamplingSettings
from megatron_minio3.rollout.crop_tool import num_image_tokens
from megatron_minio3.rollout.tokens import image_pad_runs
from megatron_minio3.rollout.trajectory import validate_trajectory

TOOL_REGEX = (
    r"<think>[a-z ]{1,6}</think>("
    r'<grounding>\{"bbox_2d": \[0\.[0-4], 0\.[0-4], 0\.[4-9], 0\.[4-9]\], "source": "(original_image|observation_[12])"\}</grounding>'
    r'|<grounding>\{"bbox_2d": \[0\.[0-9]\]\}</grounding>'
    r"|<answer>\([A-D]\)</answer>)"
)

ENGINE_CFG = RolloutConfig(
    max_turns=4,
    max_tokens_per_turn=96,
    max_total_tokens=2048,
    context_reserve_tokens=64,
    dtype="float32",
    kv_cache_memory_mb=256,
    enforce_eager=True,
    max_num_seqs=64,
    seed=0,
)
DATA_CFG = DataConfig(min_pixels=3136, max_pixels=40_000)
NUM_SAMPLES = 4


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    from megatron_minio3.rollout.engine import VllmEngine

    engine = VllmEngine(ENGINE_CFG, tiny_hf_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """8 usable prompts (one with a 3200x2400 image) plus one missing and one corrupt image file."""
    root = tmp_path_factory.mktemp("visual_search")
    path = write_visual_search_dataset(root, 7, seed=5, spec=VisualSearchSpec(width=448, height=336, num_distractors=12))
    write_visual_search_dataset(root, 1, seed=6, spec=VisualSearchSpec(width=3200, height=2400), name="huge")
    rows = json.loads(path.read_text()) + json.loads((root / "huge.json").read_text())
    rows[-1]["doc_id"] = "huge"
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    rows.append({**rows[0], "doc_id": "missing", "images": ["images/missing.png"]})
    rows.append({**rows[0], "doc_id": "corrupt", "images": ["images/corrupt.png"]})
    path.write_text(json.dumps(rows))
    return read_minio3_json(path)


@pytest.fixture(scope="module")
def rollout(engine, dataset):
    cfg = dataclasses.replace(ENGINE_CFG, guided_regex=TOOL_REGEX)
    loop = AgentLoop.from_config([engine], engine.tokenizer, engine.vision, cfg, DATA_CFG)
    batch = asyncio.run(loop.run(dataset, NUM_SAMPLES))
    return loop, batch


def test_every_trajectory_keeps_the_invariants(rollout, engine):
    loop, batch = rollout
    pad_id = loop.turns.image_pad_id
    assert len(batch.trajectories) == 8 * NUM_SAMPLES
    for traj in batch.trajectories:
        validate_trajectory(traj, image_pad_id=pad_id, merge_size=engine.vision.merge_size)
        # loss mask covers exactly the generated tokens, turn by turn
        cursor = traj.prompt_length
        for turn, text in zip(traj.turns, traj.turn_texts):
            generated = slice(cursor, cursor + turn.num_generated_tokens)
            assert all(traj.loss_mask[generated]) and turn.num_generated_tokens > 0
            assert all(lp <= 0.0 and math.isfinite(lp) for lp in traj.rollout_logprobs[generated])
            assert text in engine.tokenizer.decode(traj.token_ids[generated], skip_special_tokens=True)
            appended = slice(generated.stop, generated.stop + turn.num_appended_tokens)
            assert not any(traj.loss_mask[appended]) and not any(traj.rollout_logprobs[appended])
            cursor = appended.stop
        assert cursor == len(traj.token_ids)
        # images in the record match the <|image_pad|> runs
        runs = image_pad_runs(traj.token_ids, pad_id)
        assert [length for _, length in runs] == [num_image_tokens(g, engine.vision.merge_size) for g in traj.image_grid_thw]
        for image in traj.images:
            assert image.model.size == (image.grid_thw[2] * 14, image.grid_thw[1] * 14)
            if image.origin == "crop":
                source = traj.images[image.source_index].raw
                assert np.array_equal(np.asarray(image.raw), np.asarray(source.crop(image.box)))
        # flags
        final = traj.turns[-1]
        assert traj.exceed == (final.tool_call and traj.end_reason in ("max_turns", "max_images", "context"))
        assert traj.truncated == (not final.tool_call and final.finish_reason == "length")
        assert traj.num_turns <= ENGINE_CFG.max_turns and len(traj.token_ids) <= ENGINE_CFG.max_total_tokens
        # recomputed mrope positions cover the whole sequence
        grids = torch.tensor(traj.image_grid_thw)
        positions, _ = sequence_position_ids(
            torch.tensor(traj.token_ids), grids, image_token_id=pad_id, spatial_merge_size=engine.vision.merge_size
        )
        assert positions.shape == (3, len(traj.token_ids))
        assert positions[:, traj.prompt_length :].min() >= positions[:, : traj.prompt_length].max()


def test_the_run_went_through_every_path(rollout):
    _, batch = rollout
    trajs = batch.trajectories
    crops = [image for traj in trajs for image in traj.images if image.origin == "crop"]
    errors = [turn.tool_error for traj in trajs for turn in traj.turns if turn.tool_error]
    assert max(traj.num_turns for traj in trajs) >= 3
    assert crops  # executed zooms (which source the random model picks is up to it)
    assert any("missing the key(s) source" in error for error in errors)  # malformed calls became error turns
    assert any(traj.end_reason == "answer" for traj in trajs)
    # the missing and the corrupt image skip their prompt, with a counter; the huge one is downscaled
    assert sorted((s.uid, s.reason) for s in batch.skipped) == [
        ("visual_search/corrupt", "image_error"), ("visual_search/missing", "image_error")
    ]
    assert batch.metrics()["rollout/skipped_image_error"] == 2.0
    huge = [traj for traj in trajs if traj.uid == "visual_search/huge"]
    assert len(huge) == NUM_SAMPLES
    assert huge[0].images[0].raw.size == (3200, 2400)
    model = huge[0].images[0].model
    assert model.width * model.height <= 1.1 * DATA_CFG.max_pixels


def test_rollout_logprobs_match_a_transformers_forward(engine, dataset, tiny_hf_dir):
    """Free sampling at temperature 1: the engine's log-probs equal a recompute over the record."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    loop = AgentLoop.from_config([engine], engine.tokenizer, engine.vision, ENGINE_CFG, DATA_CFG)
    batch = asyncio.run(loop.run(dataset[:2], 1))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_hf_dir, torch_dtype=torch.float32).eval()
    processor = Qwen2VLImageProcessor.from_pretrained(tiny_hf_dir)
    for traj in batch.trajectories:
        pixels = processor(images=[image.model for image in traj.images], return_tensors="pt")
        assert pixels["image_grid_thw"].tolist() == [list(g) for g in traj.image_grid_thw]
        input_ids = torch.tensor([traj.token_ids])
        # positions from the project's own mrope index: matching vLLM here means the trainer will too
        position_ids, _ = get_rope_index(
            input_ids, pixels["image_grid_thw"], image_token_id=loop.turns.image_pad_id,
            spatial_merge_size=engine.vision.merge_size,
        )
        with torch.no_grad():
            logits = model(
                input_ids=input_ids,
                position_ids=position_ids,
                pixel_values=pixels["pixel_values"],
                image_grid_thw=pixels["image_grid_thw"],
            ).logits[0].float()
        logits[:, list(loop.turns.placeholder_ids)] -= 100.0  # the rollout's ban on placeholder tokens
        logprobs = torch.log_softmax(logits, dim=-1)
        positions = [i for i, m in enumerate(traj.loss_mask) if m]
        ids = torch.tensor([traj.token_ids[i] for i in positions])
        recomputed = logprobs[torch.tensor(positions) - 1].gather(-1, ids[:, None])[:, 0]
        rollout = torch.tensor([traj.rollout_logprobs[i] for i in positions])
        assert torch.allclose(recomputed, rollout, atol=1e-4), (recomputed - rollout).abs().max()


def _greedy_tokens(engine, loop, prompt_ids, images) -> list[int]:
    request = GenerationRequest(
        request_id=f"greedy-{next(loop.request_counter)}",
        prompt_token_ids=prompt_ids,
        images=images,
        max_tokens=12,
        sampling=SamplingSettings(temperature=0.0),
        stop=(),
        banned_token_ids=loop.turns.placeholder_ids,
    )
    return asyncio.run(engine.generate(request)).token_ids


def test_update_weights_in_place_changes_and_restores_outputs(engine, tiny_hf_dir):
    from safetensors.torch import load_file

    loop = AgentLoop.from_config([engine], engine.tokenizer, engine.vision, ENGINE_CFG, DATA_CFG)
    image = loop.model_image(Image.new("RGB", (200, 150), (200, 40, 40)), Image.Resampling.BICUBIC)
    prompt_ids = loop.turns.prompt_ids("<image>\nWhat colour is this?", 1)
    original = load_file(str(tiny_hf_dir / "model.safetensors"))
    baseline = _greedy_tokens(engine, loop, prompt_ids, [image])
    assert _greedy_tokens(engine, loop, prompt_ids, [image]) == baseline

    generator = torch.Generator().manual_seed(0)
    # vision tower only: the same image was seen before, so stale cached embeddings would hide the change
    vision = {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in original.items() if k.startswith("visual.")}
    assert engine.update_weights(vision.items()) == len(vision)
    changed = _greedy_tokens(engine, loop, prompt_ids, [image])
    assert changed != baseline

    assert engine.update_weights(original.items()) == len(original)
    assert _greedy_tokens(engine, loop, prompt_ids, [image]) == baseline

    language = {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in original.items() if not k.startswith("visual.")}
    engine.update_weights(language.items())
    assert _greedy_tokens(engine, loop, prompt_ids, [image]) != baseline
    engine.update_weights(original.items())
    assert _greedy_tokens(engine, loop, prompt_ids, [image]) == baseline


def test_later_turns_compute_only_their_new_tokens_and_every_image_is_encoded_once(engine, dataset):
    """vLLM's prefix cache holds a trajectory's context between its turns: a later turn's prefill computes only
    the tokens appended since the last turn (the observation or error turn, the last generated token), within one
    cache block. The vision tower runs once per image: the prompt image once for all samples and turns of a
    prompt, each crop once (counted in the model by EngineStats.images_encoded)."""
    cfg = dataclasses.replace(ENGINE_CFG, guided_regex=TOOL_REGEX)
    loop = AgentLoop.from_config([engine], engine.tokenizer, engine.vision, cfg, DATA_CFG)
    engine.reset_caches()
    engine.stats(reset=True)
    batch = asyncio.run(loop.run(dataset, NUM_SAMPLES, seeds=list(range(len(dataset)))))
    stats = engine.stats(reset=True)
    later_turns = 0
    for traj in batch.trajectories:
        prompt = traj.prompt_length
        for before, turn in zip(traj.turns, traj.turns[1:]):
            prompt += before.num_generated_tokens + before.num_appended_tokens
            computed = prompt - turn.num_cached_prompt_tokens
            assert turn.num_cached_prompt_tokens > 0
            assert computed <= before.num_appended_tokens + engine.block_size, (traj.uid, traj.sample_index, computed)
            later_turns += 1
    assert later_turns >= 8, later_turns
    requests = sum(traj.num_turns for traj in batch.trajectories)
    assert stats.requests == requests and stats.steps > 0 and 0 < stats.busy_s
    prompts = {traj.uid for traj in batch.trajectories}
    crops = sum(image.origin == "crop" for traj in batch.trajectories for image in traj.images)
    assert crops >= 3, crops  # 5 with these seeds
    assert stats.images_encoded == len(prompts) + crops, (stats.images_encoded, len(prompts), crops)
    assert stats.images_sent > stats.images_encoded
    assert stats.later_prompt_tokens > 0 and stats.later_cached_prompt_tokens / stats.later_prompt_tokens > 0.3


def test_seeded_rollouts_do_not_depend_on_how_they_reach_the_engine(engine, dataset, monkeypatch):
    """With a seed per request, what is generated does not depend on the way requests reach the engine: rendered
    on the engine thread or on a thread of its own, with content ids for the images or hashed by vLLM, trajectories
    free-running or turn-synchronous."""
    cfg = dataclasses.replace(ENGINE_CFG, guided_regex=TOOL_REGEX)
    loop = AgentLoop.from_config([engine], engine.tokenizer, engine.vision, cfg, DATA_CFG)
    seeds = list(range(len(dataset)))

    def rollout(**kwargs):
        engine.reset_caches()
        batch = asyncio.run(loop.run(dataset, 2, seeds=seeds, **kwargs))
        return batch.trajectories

    def same(trajectories, reference):
        """The same tokens and crops; log-probs equal up to float32 rounding (a request's log-probs come from
        engine steps shared with whichever other requests run then, and CPU GEMMs round by batch shape)."""
        assert [(t.uid, t.sample_index, t.token_ids, [i.box for i in t.images]) for t in trajectories] == \
               [(t.uid, t.sample_index, t.token_ids, [i.box for i in t.images]) for t in reference]
        for got, want in zip(trajectories, reference):
            np.testing.assert_allclose(got.rollout_logprobs, want.rollout_logprobs, rtol=0, atol=1e-5)
        return True

    reference = rollout()
    assert sum(len(t.images) for t in reference) > len(reference)  # some crops were made
    monkeypatch.setattr(engine, "_render_inline", not engine._render_inline)
    assert same(rollout(), reference)
    monkeypatch.setattr(agent_loop, "image_content_id", lambda image: "")  # no ids: vLLM hashes every image
    assert same(rollout(), reference)
    assert same(rollout(turn_synchronous=True), reference)
