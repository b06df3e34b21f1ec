"""Slow: the command-line tools at TP2 x PP2 (4 processes on 2 cores).

HF -> Megatron (TP2, PP2) -> HF with tools/convert_*.py is bit-identical and vLLM CPU generates the same
greedy tokens from it; tools/compare_hf_megatron.py reports logits within 1e-4 of transformers at (2,2)
and, from the same checkpoint, at (1,1). The checkpoint is the tied-embedding architecture (3 layers, split
1 + 2 over PP2) with weights redrawn at unit scale.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megatron_minio3.convert.safetensors_io import INDEX_NAME, SafetensorsReader
from tests.distributed import REPO_ROOT, run_torchrun
from tests.integration.scripts.qwen_checkpoints import sharpened_copy

pytestmark = pytest.mark.slow

TOOLS = REPO_ROOT / "tools"
SCRIPTS = REPO_ROOT / "tests" / "integration" / "scripts"


def run_tool(*args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="module")
def round_trip(tiny_hf_dir_tied, tmp_path_factory):
    work = tmp_path_factory.mktemp("tp2_pp2")
    original = sharpened_copy(tiny_hf_dir_tied, work / "original", seed=1)
    megatron_dir = work / "megatron_tp2_pp2"
    run_torchrun(TOOLS / "convert_hf_to_megatron.py", 4,
                 ["--hf-dir", original, "--out-dir", megatron_dir, "--tp", "2", "--pp", "2"], timeout=900)
    exported = work / "exported"
    run_tool(TOOLS / "convert_megatron_to_hf.py", "--megatron-dir", megatron_dir, "--out-dir", exported,
             "--hf-config-dir", original, "--max-shard-size", "4MB", "--bucket-size", "2MB")
    return original, megatron_dir, exported


def test_round_trip_is_bit_identical(round_trip):
    original, _, exported = round_trip
    with SafetensorsReader(original) as before, SafetensorsReader(exported) as after:
        assert sorted(before.names()) == sorted(after.names())
        for name in before.names():
            a, b = before.read(name), after.read(name)
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert len(set(json.loads((exported / INDEX_NAME).read_text())["weight_map"].values())) > 1
    assert (exported / "config.json").read_bytes() == (original / "config.json").read_bytes()
    assert sorted(p.name for p in exported.parent.iterdir()) == ["exported", "megatron_tp2_pp2", "original"]


def test_vllm_greedy_generation_is_identical(round_trip):
    original, _, exported = round_trip
    out = exported.parent / "vllm.json"
    proc = subprocess.run([sys.executable, SCRIPTS / "qwen_vllm_greedy.py", out, original, exported],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-8000:]
    results = json.loads(out.read_text())
    assert results[str(exported)] == results[str(original)]
    assert all(len(prompt["token_ids"]) == 24 for prompt in results[str(original)])


@pytest.mark.parametrize("tp,pp", [(2, 2), (1, 1)])
def test_compare_tool_reports_parity(round_trip, tp, pp):
    original, megatron_dir, _ = round_trip
    proc = run_torchrun(TOOLS / "compare_hf_megatron.py", tp * pp,
                        ["--hf-dir", original, "--megatron-dir", megatron_dir, "--tp", tp, "--pp", pp], timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout[-4000:]
    result = json.loads(lines[0])
    assert (result["tp"], result["pp"]) == (tp, pp)
    assert result["max_abs_logit"] > 5.0
    assert result["max_abs_diff"] <= 1e-4 and result["mean_abs_diff"] <= result["max_abs_diff"]


def test_export_refuses_another_architecture(round_trip, tiny_hf_dir, tmp_path):
    _, megatron_dir, _ = round_trip
    proc = run_tool(TOOLS / "convert_megatron_to_hf.py", "--megatron-dir", megatron_dir, "--out-dir",
                    tmp_path / "out", "--hf-config-dir", tiny_hf_dir, check=False)
    assert proc.returncode != 0
    assert "describes another architecture" in proc.stderr and "text.num_layers: 3 != 2" in proc.stderr
    assert not (tmp_path / "out").exists()
