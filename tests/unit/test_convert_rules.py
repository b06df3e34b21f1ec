"""HF <-> Megatron conversion rules: layouts, TP split/merge, the released model sizes, clear errors."""
from __future__ import annotations

import copy

import pytest
import torch

from megatron_minio3.convert.qwen2_5_vl import (
    RELEASED,
    TRANSFORMERS5,
    GateUp,
    InterleavedQKV,
    Reshaped,
    all_rules,
    canonical_megatron_name,
    checkpoint_rules,
    detect_naming,
    hf_to_megatron,
    megatron_to_hf,
    parameter_rule,
    validate_hf_tensors,
)
from megatron_minio3.convert.tp import merge_ranks, split_for_rank
from megatron_minio3.models.qwen2_5_vl.config import parse_hf_config
from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import released_tensor_name

_VISION = {  # identical in every Qwen2.5-VL release
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu",
}


def released_config(hidden, intermediate, layers, heads, kv_heads, vocab, tied) -> dict:
    """config.json of a released Qwen2.5-VL checkpoint (the flat transformers-4 layout)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "tie_word_embeddings": tied, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 128000, "hidden_act": "silu", "use_sliding_window": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_config": {**_VISION, "out_hidden_size": hidden},
    }


RELEASED_CONFIGS = {
    "3B": released_config(2048, 11008, 36, 16, 2, 151936, tied=True),
    "7B": released_config(3584, 18944, 28, 28, 4, 152064, tied=False),
    "32B": released_config(5120, 27648, 64, 40, 8, 152064, tied=False),
    "72B": released_config(8192, 29568, 80, 64, 8, 152064, tied=False),
}


def hf_meta_state(config_dict: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of transformers' own model for the config (built on the meta device: no memory)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(config_dict)))
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config_dict["tie_word_embeddings"]:
        del state["lm_head.weight"]  # tied: not stored
    return state


@pytest.mark.parametrize("size", sorted(RELEASED_CONFIGS))
def test_rules_cover_exactly_the_released_tensors(size):
    cfg = parse_hf_config(RELEASED_CONFIGS[size])
    hf_state = hf_meta_state(RELEASED_CONFIGS[size])
    for naming, rename in ((TRANSFORMERS5, lambda n: n), (RELEASED, released_tensor_name)):
        expected = {rename(n): shape for n, shape in hf_state.items()}
        from_rules = {}
        for rule in checkpoint_rules(cfg, naming):
            from_rules.update(zip(rule.hf_names, rule.hf_shapes()))
        assert from_rules == expected
        validate_hf_tensors(expected, cfg, naming)
    assert cfg.text.tie_word_embeddings == (size == "3B")


@pytest.mark.parametrize("size", sorted(RELEASED_CONFIGS))
def test_megatron_to_hf_and_back_on_meta_tensors(size):
    cfg = parse_hf_config(RELEASED_CONFIGS[size])
    for rule in all_rules(cfg, TRANSFORMERS5):
        full = torch.empty(rule.megatron_shape, device="meta")
        pairs = megatron_to_hf(rule.megatron_name, full, cfg)
        if not rule.exported:
            assert pairs == [] and rule.megatron_name == "language_model.output_layer.weight"
            continue
        assert [name for name, _ in pairs] == list(rule.hf_names)
        back = hf_to_megatron(rule.megatron_name, [t for _, t in pairs], cfg)
        assert tuple(back.shape) == rule.megatron_shape


def test_qkv_interleaving_is_per_key_value_group():
    layout = InterleavedQKV(heads_per_group=2, head_dim=1)
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    fused = layout.from_parts([q, k, v])
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(layout.to_parts(fused), (q, k, v)))
    bias = layout.from_parts([q[:, 0], k[:, 0], v[:, 0]])
    assert bias.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_shards_are_chunks_of_every_hf_part(tp):
    """Splitting the full tensor equals assembling each rank's chunks of the HF parts (what the converter
    reads from disk), and merging the shards restores the full tensor."""
    generator = torch.Generator().manual_seed(0)
    cases = [
        (InterleavedQKV(heads_per_group=3, head_dim=2), 0, [(24, 5), (8, 5), (8, 5)]),
        (InterleavedQKV(heads_per_group=3, head_dim=2), 0, [(24,), (8,), (8,)]),
        (GateUp(), 0, [(12, 5), (12, 5)]),
        (Reshaped((3, 2, 2, 2)), None, [(4, 3, 2, 2, 2)]),
    ]
    for layout, tp_dim, shapes in cases:
        parts = [torch.randn(s, generator=generator) for s in shapes]
        full = layout.from_parts(parts)
        shards = [split_for_rank(full, layout, tp_dim, r, tp) for r in range(tp)]
        if tp_dim is not None:
            for rank, shard in enumerate(shards):
                chunks = [torch.chunk(p, tp, dim=tp_dim)[rank] for p in parts]
                assert torch.equal(shard, layout.from_parts(chunks))
        assert torch.equal(merge_ranks(shards, layout, tp_dim), full)


def test_gate_up_shard_holds_its_gate_rows_then_its_up_rows():
    gate, up = torch.arange(4.0).view(4, 1), torch.arange(10.0, 14.0).view(4, 1)
    full = GateUp().from_parts([gate, up])
    shard1 = split_for_rank(full, GateUp(), 0, rank=1, size=2)
    assert shard1.flatten().tolist() == [2, 3, 12, 13]


def test_canonical_names_and_layer_offset():
    assert canonical_megatron_name("language_model.decoder.layers.0.input_layernorm.weight", 5) == (
        "language_model.decoder.layers.5.self_attention.linear_qkv.layer_norm_weight"
    )
    assert canonical_megatron_name("language_model.decoder.layers.1.pre_mlp_layernorm.weight") == (
        "language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    )
    assert canonical_megatron_name("vision_model.blocks.3.norm1.weight", 7) == "vision_model.blocks.3.norm1.weight"


def test_tied_output_layer_reads_the_embedding():
    cfg = parse_hf_config(RELEASED_CONFIGS["3B"])
    rule = parameter_rule("language_model.output_layer.weight", cfg, RELEASED)
    assert rule.hf_names == ("model.embed_tokens.weight",) and not rule.exported
    untied = parse_hf_config(RELEASED_CONFIGS["7B"])
    assert parameter_rule("language_model.output_layer.weight", untied, RELEASED).hf_names == ("lm_head.weight",)


def test_errors_name_the_tensor_at_fault():
    cfg = parse_hf_config(RELEASED_CONFIGS["7B"])
    shapes = {}
    for rule in checkpoint_rules(cfg, RELEASED):
        shapes.update(zip(rule.hf_names, rule.hf_shapes()))
    broken = dict(shapes)
    del broken["model.layers.3.self_attn.k_proj.bias"]
    broken["model.layers.99.mlp.gate_proj.weight"] = (1, 1)
    broken["visual.merger.mlp.0.weight"] = (5120, 5121)
    with pytest.raises(ValueError) as info:
        validate_hf_tensors(broken, cfg, RELEASED, where="/ckpt")
    message = str(info.value)
    assert "missing tensors: model.layers.3.self_attn.k_proj.bias" in message
    assert "unexpected tensors: model.layers.99.mlp.gate_proj.weight" in message
    assert "visual.merger.mlp.0.weight: (5120, 5121) (expected (5120, 5120))" in message

    with pytest.raises(ValueError, match="'language_model.decoder.layers.0.mlp.linear_fc2.weight' has shape"):
        megatron_to_hf("language_model.decoder.layers.0.mlp.linear_fc2.weight", torch.zeros(2, 2), cfg)
    with pytest.raises(ValueError, match="HF tensor 'model.language_model.layers.0.self_attn.k_proj.weight' has shape"):
        rule = parameter_rule("language_model.decoder.layers.0.self_attention.linear_qkv.weight", cfg, TRANSFORMERS5)
        hf_to_megatron(rule.megatron_name, [torch.zeros(s) for s in ((3584, 3584), (512, 3583), (512, 3584))], cfg)
    with pytest.raises(ValueError, match="no HF conversion rule for Megatron tensor 'language_model.decoder.foo'"):
        parameter_rule("language_model.decoder.foo", cfg, TRANSFORMERS5)


def test_unknown_or_inconsistent_configs_are_value_errors():
    llama = dict(RELEASED_CONFIGS["7B"], architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ValueError, match="unknown architecture .*model_type='llama'"):
        parse_hf_config(llama)
    no_heads = dict(RELEASED_CONFIGS["7B"])
    del no_heads["num_attention_heads"]
    with pytest.raises(ValueError, match="missing key 'num_attention_heads'"):
        parse_hf_config(no_heads)
    with pytest.raises(ValueError, match="mrope_section"):
        parse_hf_config(dict(RELEASED_CONFIGS["7B"], rope_scaling={"type": "mrope", "mrope_section": [16, 24, 23]}))
    with pytest.raises(ValueError, match="use_sliding_window"):
        parse_hf_config(dict(RELEASED_CONFIGS["7B"], use_sliding_window=True))
    with pytest.raises(ValueError, match="no Qwen2.5-VL language-model tensors"):
        detect_naming(["encoder.weight"], where="/ckpt")


def test_transformers5_config_layout_parses_like_the_released_one():
    from transformers import Qwen2_5_VLConfig

    released = parse_hf_config(RELEASED_CONFIGS["3B"])
    nested = Qwen2_5_VLConfig(**copy.deepcopy(RELEASED_CONFIGS["3B"])).to_dict()
    assert "text_config" in nested
    assert parse_hf_config(nested) == released
