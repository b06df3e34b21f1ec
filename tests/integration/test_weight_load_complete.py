"""A weight sync leaves no tensor of the vLLM engine unloaded, and vLLM's per-call reload warnings stay quiet.

vLLM's in-place reload warns after every reload call about each module that got nothing in that call ("<class>:
Failed to load weights") and lists every parameter the call did not load ("Following weights were not loaded from
checkpoint: {...}"). A sync is one call per bucket, so each call names whatever travels in the other buckets;
VllmEngine drops the two warnings around its reload calls (rollout/engine.py). This test shows what they mean and
that dropping them hides nothing: after a colocated sync (tiny checkpoint, 768 KiB buckets, real vLLM CPU) every
engine parameter equals the stacked HF tensors sent, name by name (linear weights read back from the CPU GEMM
kernels, which hold them), no element keeps its pre-sync value, and the buffers no checkpoint holds are unchanged.
"""
from __future__ import annotations

import json

import pytest

from tests.distributed import REPO_ROOT, run_torchrun

SCRIPT = REPO_ROOT / "tests/integration/scripts/wsync_complete.py"
BUCKET_BYTES = 768 << 10  # many buckets (one reload call each) for the tiny model's ~9 MB
# modules whose only tensors are buffers no checkpoint holds: rotary cos/sin caches, the image mean/std
BUFFER_ONLY_MODULES = {"RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm"}


@pytest.mark.slow  # 42 s; the default run keeps the colocated sync's parity test (test_weight_sync.py)
def test_sync_loads_every_tensor_and_drops_only_the_partial_reload_warnings(tiny_hf_dir, tmp_path):
    run_torchrun(SCRIPT, 1, ["--hf-dir", tiny_hf_dir, "--out-dir", tmp_path, "--bucket-bytes", BUCKET_BYTES],
                 timeout=600, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    r = json.loads((tmp_path / "result.json").read_text())
    params = set(r["engine_parameters"])
    visual = {name for name in params if name.startswith("visual.")}

    # What the warnings mean, from vLLM's own reload calls: each call names every module (by class) that got no
    # tensor in it and lists every parameter it did not load; a call with the whole checkpoint lists no parameter
    # and still names the buffer-only modules, which keep their values.
    control = r["control"]
    assert set(control["vision"]["not_loaded"]) == params - visual
    assert set(control["language"]["not_loaded"]) == visual
    assert control["whole"]["not_loaded"] is None
    assert set(control["whole"]["failed_classes"]) == BUFFER_ONLY_MODULES
    assert {"QKVParallelLinear", "ParallelLMHead"} <= set(control["vision"]["failed_classes"])
    assert {"Conv3dLayer"} <= set(control["language"]["failed_classes"])

    # The sync: every checkpoint tensor sent once, over many buckets
    assert r["sent_tensors"] == r["checkpoint_tensors"]
    assert r["stats"]["num_tensors"] == len(r["checkpoint_tensors"])
    assert r["num_buckets"] == r["stats"]["num_buckets"] > 10
    # ... and loaded: every engine parameter holds exactly the HF tensors stacked into it, none left out
    assert r["engine_parameters"] == r["expected_parameters"]
    assert r["mismatched"] == []
    assert r["elements_left_at_old_value"] == {}
    # the linear weights vLLM CPU keeps only in its GEMM kernels were checked there
    assert set(r["empty_stored"]) <= set(r["read_from_kernel"])
    assert len(r["read_from_kernel"]) >= 14 and "language_model.lm_head.weight" in r["read_from_kernel"]
    # buffers (rotary caches, image mean/std, attention scales) are not checkpoint tensors: untouched
    assert any(name.endswith("cos_sin_cache") for name in r["buffers"]) and "visual.input_norm.weight" in r["buffers"]
    assert r["buffers_changed"] == []

    # Through VllmEngine the two warnings are dropped, nothing else is, and the filter is gone after the call
    assert r["sync_records"] == {"failed_classes": [], "not_loaded": None, "other_warnings": []}
    assert r["filters_unchanged"]
    print(f"sync of {len(r['sent_tensors'])} tensors in {r['num_buckets']} buckets: "
          f"{len(params)} engine parameters all loaded ({len(r['read_from_kernel'])} read from GEMM kernels)")
