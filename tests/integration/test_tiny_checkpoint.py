"""The generated checkpoint is a real Qwen2.5-VL checkpoint: transformers and vLLM CPU load and run it."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import SPECIAL_TOKENS, make_tiny_checkpoint
from tests.distributed import REPO_ROOT

TWO_IMAGE_CHAT = [
    {"role": "user", "content": [
        {"type": "text", "text": "Compare "}, {"type": "image"},
        {"type": "text", "text": " with "}, {"type": "image"}, {"type": "text", "text": ". Which is brighter?"},
    ]},
]


def _digests(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_same_bytes_and_other_seed_other_weights(tmp_path, tiny_hf_dir):
    again = make_tiny_checkpoint(tmp_path / "again", size="tiny", seed=0)
    assert _digests(again) == _digests(tiny_hf_dir)
    other = make_tiny_checkpoint(tmp_path / "other", size="tiny", seed=5)
    assert _digests(other)["model.safetensors"] != _digests(tiny_hf_dir)["model.safetensors"]
    assert _digests(other)["tokenizer.json"] == _digests(tiny_hf_dir)["tokenizer.json"]


def test_bad_architecture_knobs_are_named(tmp_path):
    with pytest.raises(ValueError, match="mrope_section"):
        make_tiny_checkpoint(tmp_path / "x", mrope_section=(8, 8, 8))
    with pytest.raises(ValueError, match="num_kv_heads"):
        make_tiny_checkpoint(tmp_path / "x", num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown architecture knobs.*'num_layer'"):
        make_tiny_checkpoint(tmp_path / "x", num_layer=3)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fixture", ["tiny_hf_dir", "tiny_hf_dir_tied"])
def test_transformers_round_trip_with_two_images(request, fixture, synthetic_images):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpt = request.getfixturevalue(fixture)
    processor = AutoProcessor.from_pretrained(ckpt)
    tokenizer = processor.tokenizer
    for token in SPECIAL_TOKENS:
        ids = tokenizer.convert_tokens_to_ids([token])
        assert ids[0] is not None and tokenizer.decode(ids) == token, token
    model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
    config = json.loads((ckpt / "config.json").read_text())
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.text_config.vocab_size >= len(tokenizer)

    text = processor.apply_chat_template(TWO_IMAGE_CHAT, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2

    inputs = processor(text=[text], images=synthetic_images, return_tensors="pt")
    grid = inputs["image_grid_thw"].tolist()
    assert grid[0] != grid[1], "the two images must have different sizes"
    num_pads = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert num_pads == sum(t * h * w for t, h, w in grid) // 4
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], config["vocab_size"])
    assert torch.isfinite(logits).all()

    # Saved with the released names: nothing missing, nothing unexpected when reloading.
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert any(n.startswith("visual.blocks.") for n in names) and any(n.startswith("model.layers.") for n in names)
    assert ("lm_head.weight" in names) == (not config["tie_word_embeddings"])


def test_vllm_cpu_generates_with_an_image_like_transformers(tiny_hf_dir, synthetic_images, tmp_path):
    """vLLM CPU serves the checkpoint with an image input; greedy tokens equal transformers' greedy tokens."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image_path = tmp_path / "img.png"
    synthetic_images[0].save(image_path)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests/integration/scripts/vllm_generate.py"), str(tiny_hf_dir),
         str(image_path), "--max-tokens", "8"],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == 1
    vllm_out = results[0]
    assert 1 <= len(vllm_out["token_ids"]) <= 8

    processor = AutoProcessor.from_pretrained(tiny_hf_dir)
    model = AutoModelForImageTextToText.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[synthetic_images[0]], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == vllm_out["prompt_token_ids"]
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    hf_tokens = generated[0, inputs["input_ids"].shape[1]:].tolist()
    # Both stop at the first end-of-turn token (generation_config.json lists the same EOS ids to both).
    assert hf_tokens == vllm_out["token_ids"]


def test_cli_writes_the_requested_architecture(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools/make_tiny_checkpoint.py"), "--out", str(out), "--seed", "3",
         "--num-layers", "3", "--vision-depth", "3", "--fullatt-block-indexes", "0,2", "--tie-word-embeddings", "true"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["tie_word_embeddings"] is True
    assert config["vision_config"]["depth"] == 3 and config["vision_config"]["fullatt_block_indexes"] == [0, 2]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["bytes"] > 0

    bad = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools/make_tiny_checkpoint.py"), "--out", str(tmp_path / "bad"),
         "--num-kv-heads", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "num_kv_heads 3" in bad.stderr and not (tmp_path / "bad").exists()
