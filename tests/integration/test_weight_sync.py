"""Weights from a live Megatron actor into running vLLM engines (CPU, fp32, gloo, vLLM CPU).

Separate engine: the actor (TP2 by default, PP2 + tied embeddings in the slow test) takes two optimizer steps,
then its rank 0 broadcasts the buckets over a gloo weight group to a vLLM engine in another process, which
had already run the parity probe with the old weights (so its prefix and encoder caches hold stale entries).
After the sync the engine's greedy tokens equal transformers' from the actor's exported HF checkpoint and its
log-probs equal the actor's on two-image, two-turn sequences.
Colocated: policy and engine in one process (InProcessTarget), with the peak extra memory of the sync.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_minio3.parallel import free_port
from megatron_minio3.rollout.tokens import image_pad_runs
from megatron_minio3.weights.probe import parity_metrics
from tests.distributed import REPO_ROOT, run_torchrun
from tests.integration.scripts.wsync_common import PROBE_MAX_TOKENS

SCRIPTS = REPO_ROOT / "tests/integration/scripts"
BUCKET_BYTES = 768 << 10  # below the tiny models' fc1 and merger fc1 (1 MiB, 2 MiB): those travel alone
LOGPROB_TOLERANCE = 1e-3


def run_with_separate_engine(hf_dir, out_dir, tp: int, pp: int) -> dict:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with open(out_dir / "engine.log", "w") as log:
        engine = subprocess.Popen(
            [sys.executable, str(SCRIPTS / "wsync_engine.py"), "--hf-dir", str(hf_dir), "--out-dir", str(out_dir),
             "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
        )
        try:
            run_torchrun(
                SCRIPTS / "wsync_actor.py", tp * pp,
                ["--hf-dir", hf_dir, "--out-dir", out_dir, "--tp", tp, "--pp", pp, "--port", port, "--steps", 2,
                 "--bucket-bytes", BUCKET_BYTES],
                timeout=600,
            )
            returncode = engine.wait(timeout=300)
        finally:
            if engine.poll() is None:
                engine.kill()
                engine.wait()
    assert returncode == 0, (out_dir / "engine.log").read_text()[-8000:]
    probe = torch.load(out_dir / "probe.pt", weights_only=False)
    return {
        "ranks": [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(tp * pp)],
        "before": probe["before"],
        "after": probe["after"],
        "engine_stats": probe["stats"],
        "actor_logprobs": torch.load(out_dir / "actor_logprobs.pt"),
        "export_dir": out_dir / "hf_export",
    }


def transformers_greedy(hf_dir, sequences) -> list[list[list[int]]]:
    """transformers' greedy continuation of each generated turn's prompt (the turn's images included)."""
    from transformers import AutoImageProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    processor = AutoImageProcessor.from_pretrained(hf_dir)
    image_token_id = model.config.image_token_id
    continuations = []
    for sequence in sequences:
        turns = []
        for start, _ in sequence.generated_spans:
            input_ids = torch.tensor([sequence.token_ids[:start]])
            num_images = len(image_pad_runs(sequence.token_ids[:start], image_token_id))
            pixels = processor(images=list(sequence.images[:num_images]), return_tensors="pt")
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    mm_token_type_ids=(input_ids == image_token_id).int(),  # how transformers finds the images
                    pixel_values=pixels["pixel_values"],
                    image_grid_thw=pixels["image_grid_thw"],
                    max_new_tokens=PROBE_MAX_TOKENS,
                    do_sample=False,
                )
            turns.append(output[0, start:].tolist())
        continuations.append(turns)
    return continuations


def check_sync(result: dict, original_hf_dir) -> dict:
    from safetensors.torch import load_file

    first = result["ranks"][0]
    export = first["export_before_training"]
    assert export["names_match"] and export["mismatched"] == [], export  # bit-exact before any update
    assert len(export["bucket_bytes"]) > 3
    for rank in result["ranks"]:
        assert rank["sync"]["num_tensors"] == export["num_tensors"] == result["engine_stats"].num_tensors
        assert rank["sync"]["num_buckets"] == len(export["bucket_bytes"]) == result["engine_stats"].num_buckets
        assert all(norm > 0 for norm in rank["grad_norms"])
    # the engine now generates with the updated weights, fresh caches
    before, after = result["before"], result["after"]
    assert [s.uid for s in after] == ["two_images", "one_image"]
    for old, new in zip(before, after):
        assert len(new.images) == len(old.images) >= 2 and len(new.generated_spans) == 2
        assert old.token_ids != new.token_ids
    metrics = parity_metrics(after, result["actor_logprobs"])
    assert metrics["probe/num_tokens"] == 2 * 2 * PROBE_MAX_TOKENS
    assert metrics["probe/max_abs_logprob_diff"] <= LOGPROB_TOLERANCE, metrics
    # the exported checkpoint holds the trained weights, under the original names
    exported = load_file(str(result["export_dir"] / "model.safetensors"))
    original = load_file(str(original_hf_dir / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert any(not torch.equal(exported[name], original[name]) for name in original)
    engine_turns = [[list(seq.token_ids[start:stop]) for start, stop in seq.generated_spans] for seq in after]
    assert transformers_greedy(result["export_dir"], after) == engine_turns
    return metrics


def test_tp2_actor_updates_reach_a_separate_engine(tiny_hf_dir, tmp_path):
    metrics = check_sync(run_with_separate_engine(tiny_hf_dir, tmp_path, tp=2, pp=1), tiny_hf_dir)
    print(f"TP2 -> engine: {metrics}")


@pytest.mark.slow
def test_pp2_tied_actor_updates_reach_a_separate_engine(tiny_hf_dir_tied, tmp_path):
    metrics = check_sync(run_with_separate_engine(tiny_hf_dir_tied, tmp_path, tp=1, pp=2), tiny_hf_dir_tied)
    print(f"PP2 (tied) -> engine: {metrics}")


@pytest.fixture(scope="module")
def mid_hf_dir(tmp_path_factory):
    """About 98 MB of fp32 weights: big enough for the sync's memory to stand out of the process's noise."""
    from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "mid", size="tiny", seed=2, hidden_size=512, intermediate_size=2816,
        num_layers=4, num_heads=8, num_kv_heads=2, mrope_section=(16, 8, 8), vision_hidden_size=256,
        vision_intermediate_size=1024, vision_num_heads=4,
    )


def test_colocated_sync_parity_and_peak_memory(mid_hf_dir, tmp_path):
    bucket_bytes = 16 << 20
    run_torchrun(
        SCRIPTS / "wsync_colocated.py", 1,
        ["--hf-dir", mid_hf_dir, "--out-dir", tmp_path, "--bucket-bytes", bucket_bytes],
        timeout=600,
        # freed tensors must leave the resident set for VmHWM to measure the sync's own peak
        env={"MALLOC_MMAP_THRESHOLD_": "65536", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    result = json.loads((tmp_path / "result.json").read_text())
    print(f"colocated sync: {result}")
    assert all(result["tokens_changed"])
    assert result["metrics"]["probe/max_abs_logprob_diff"] <= LOGPROB_TOLERANCE, result["metrics"]
    assert result["model_bytes"] > 90e6 and result["num_buckets"] > 4
    assert result["largest_tensor_bytes"] < result["largest_bucket_bytes"] <= bucket_bytes
    # the export holds one bucket at a time
    assert result["export_extra_peak_bytes"] <= 1.25 * result["largest_bucket_bytes"], result
    # the export plus vLLM's in-place reload: within 2 buckets + the largest tensor
    assert result["sync_extra_peak_bytes"] <= 2 * bucket_bytes + result["largest_tensor_bytes"], result


@pytest.mark.parametrize("tp", [1, 2])
def test_view_buckets_equal_flat_buckets(tiny_hf_dir, tmp_path, tp):
    """What an engine in the trainer's process loads (views of the parameters, TP-gathered tensors in the bucket
    buffer) is what other processes get (flat buckets) and what the checkpoint holds, in the checkpoint's dtype
    and cast to bfloat16."""
    run_torchrun(SCRIPTS / "wsync_views.py", tp,
                 ["--hf-dir", tiny_hf_dir, "--out-dir", tmp_path, "--bucket-bytes", BUCKET_BYTES, "--tp", tp],
                 timeout=300)
    result = json.loads((tmp_path / "result.json").read_text())
    for dtype, r in result.items():
        assert r["num_buckets"] > 3 and r["same_names"] and r["contiguous"], (dtype, r)
        assert r["mismatched"] == [] and r["differs_from_checkpoint"] == [], (dtype, r)
        assert r["flat_buffers"] == 1 and (r["view_flat_numel"] == 0) == (tp == 1), (dtype, r)
    assert result["bfloat16"]["aliasing"] == []  # a cast is a copy
    aliasing = set(result["float32"]["aliasing"])
    assert any(name.endswith("layernorm.weight") for name in aliasing)  # not split over TP: always a view
    assert not any(name.endswith(("q_proj.weight", "k_proj.bias")) for name in aliasing)  # re-laid-out
    # language-model tensors split over TP: at TP=1 views of the parameters; at TP=2 gathered into the buffer
    split = {name for name in aliasing if name.endswith("embed_tokens.weight") or (
        ".layers." in name and name.endswith(("gate_proj.weight", "up_proj.weight", "o_proj.weight")))}
    assert bool(split) == (tp == 1), split
