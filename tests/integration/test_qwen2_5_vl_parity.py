"""Megatron Qwen2.5-VL equals transformers at TP/PP (1,1), (2,1), (1,2): logits, gradients, freeze switches;
HF -> Megatron -> HF is bit-identical and vLLM CPU generates the same greedy tokens from the result.

One 2-process torchrun (scripts/qwen_parity.py) does all the Megatron work for two architectures:
"untied" (the default tiny checkpoint, converted at TP2) and "tied" (tied embeddings, 3 layers split 1 + 2
over PP2, GQA 4:1, other mrope sections; converted at PP2). Weights are redrawn at unit scale so that
attention is peaked and logits are O(10) (see scripts/qwen_checkpoints.py).
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_minio3.convert.safetensors_io import INDEX_NAME, SafetensorsReader
from megatron_minio3.models.qwen2_5_vl.model import pipeline_layer_split
from tests.distributed import REPO_ROOT, run_torchrun
from tests.integration.scripts.qwen_checkpoints import sharpened_copy

SCRIPTS = REPO_ROOT / "tests" / "integration" / "scripts"
CHECKPOINTS = ("untied", "tied")
LAYOUTS = ((1, 1), (2, 1), (1, 2))
LOGIT_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def parity_run(tiny_hf_dir, tiny_hf_dir_tied, tmp_path_factory):
    work = tmp_path_factory.mktemp("qwen_parity")
    originals = {
        "untied": sharpened_copy(tiny_hf_dir, work / "untied_hf", seed=0),
        "tied": sharpened_copy(tiny_hf_dir_tied, work / "tied_hf", seed=1),
    }
    out = work / "results.json"
    run_torchrun(
        SCRIPTS / "qwen_parity.py",
        2,
        ["--out", out, "--work-dir", work,
         "--ckpt", f"untied@2x1={originals['untied']}", "--ckpt", f"tied@1x2={originals['tied']}",
         "--layouts", ",".join(f"{tp}x{pp}" for tp, pp in LAYOUTS), "--grad-layouts", "2x1,1x2"],
        timeout=900,
    )
    return {"records": json.loads(out.read_text()), "work": work, "originals": originals}


def records(parity_run, **match):
    found = [r for r in parity_run["records"] if all(r.get(k) == v for k, v in match.items())]
    assert found, f"no result for {match}"
    return found


@pytest.mark.parametrize("tp,pp", LAYOUTS)
@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_logits_match_transformers(parity_run, ckpt, tp, pp):
    results = records(parity_run, kind="logits", ckpt=ckpt, tp=tp, pp=pp)
    assert sorted(r["micro_batch"] for r in results) == [0, 1]  # two images; padded batch of two sequences
    for result in results:
        assert result["max_abs_logit"] > 5.0  # the comparison is not between near-zero logits
        assert result["max_abs_diff"] <= LOGIT_TOLERANCE, result


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_gradients_match_transformers(parity_run, ckpt, tp, pp):
    results = records(parity_run, kind="grads", ckpt=ckpt, tp=tp, pp=pp)
    assert len(results) == 2  # every rank compared all its parameters
    for result in results:
        assert result["num_params"] > 5
        assert result["max_rel_grad_diff"] <= 1e-4, result


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_freeze_switches(parity_run, ckpt):
    for result in records(parity_run, kind="freeze", ckpt=ckpt):
        frozen_vision = result["vision+merger frozen"]
        frozen_lm = result["language model frozen"]
        if result["first_stage"]:
            assert frozen_vision["vision"][0] == 0 and frozen_vision["merger"][0] == 0
            assert frozen_lm["vision"][0] == frozen_lm["vision"][1] > 0
            assert frozen_lm["merger"][0] == frozen_lm["merger"][1] > 0
        else:
            assert frozen_lm["vision"][1] == 0  # no vision encoder after the first stage
        assert frozen_vision["language_model"][0] == frozen_vision["language_model"][1] > 0
        assert frozen_lm["language_model"][0] == 0


@pytest.mark.parametrize("ckpt", CHECKPOINTS)
def test_round_trip_is_bit_identical(parity_run, ckpt):
    original, exported = parity_run["originals"][ckpt], parity_run["work"] / f"{ckpt}_exported"
    with SafetensorsReader(original) as before, SafetensorsReader(exported) as after:
        assert sorted(before.names()) == sorted(after.names())
        for name in before.names():
            a, b = before.read(name), after.read(name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert len(set(json.loads((exported / INDEX_NAME).read_text())["weight_map"].values())) > 1
    for file_name in ("config.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
                      "chat_template.jinja", "generation_config.json"):
        assert (exported / file_name).read_bytes() == (original / file_name).read_bytes(), file_name
    leftovers = [p.name for p in parity_run["work"].iterdir() if ".tmp-" in p.name]
    assert leftovers == []  # outputs were renamed into place


def test_vllm_greedy_generation_is_identical_after_round_trip(parity_run):
    original, exported = parity_run["originals"]["tied"], parity_run["work"] / "tied_exported"
    out = parity_run["work"] / "vllm.json"
    proc = subprocess.run([sys.executable, SCRIPTS / "qwen_vllm_greedy.py", out, original, exported],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-8000:]
    results = json.loads(out.read_text())
    before, after = results[str(original)], results[str(exported)]
    assert len(before) == len(after) == 2
    for prompt_before, prompt_after in zip(before, after):
        assert len(prompt_before["token_ids"]) == 24
        assert prompt_after["token_ids"] == prompt_before["token_ids"]
        assert prompt_after["logprobs"] == prompt_before["logprobs"]
        assert prompt_after["prompt_logprobs"] == prompt_before["prompt_logprobs"]
    assert len(before[0]["prompt_logprobs"]) > 200  # the two-image prompt was scored token by token


def test_pipeline_layer_split():
    assert pipeline_layer_split(4, 2) is None
    assert pipeline_layer_split(3, 2) == (1, 2)
    assert pipeline_layer_split(28, 3) == (9, 10)  # 7B over 3 stages: 9 + 9 + 10
    assert pipeline_layer_split(80, 6) == (14, 14)  # 72B over 6 stages: 14 + 4 x 13 + 14
    with pytest.raises(ValueError, match="cannot split 2 decoder layers over 4 pipeline stages"):
        pipeline_layer_split(2, 4)
