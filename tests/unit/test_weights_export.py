"""Weight export, the pure parts: TP shards -> HF tensors through the conversion rules, bucket plans, errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_minio3.config.weights import WeightsConfig
from megatron_minio3.convert.qwen2_5_vl import RELEASED, TRANSFORMERS5, all_rules, checkpoint_rules, megatron_to_hf
from megatron_minio3.convert.tp import merge_ranks, split_for_rank
from megatron_minio3.models.qwen2_5_vl.config import parse_hf_config
from megatron_minio3.weights.bucket import Bucket, TensorEntry, bucket_views
from megatron_minio3.weights.export import (
    assemble_hf_part,
    assign_stages,
    local_shards,
    plan_buckets,
    reload_group,
    resolve_export_dtype,
    shard_shape,
)


def config_dict(hidden, intermediate, layers, heads, kv_heads, vocab, tied, vision_depth, vision_hidden) -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "tie_word_embeddings": tied, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 4096, "hidden_act": "silu",
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4,
        "vision_config": {
            "depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
            "num_heads": 2, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "window_size": 112, "fullatt_block_indexes": [0], "out_hidden_size": hidden, "hidden_act": "silu",
        },
    }


SMALL = {
    "untied_gqa2": parse_hf_config(config_dict(64, 96, 2, 8, 4, 128, False, 1, 32)),
    "tied_gqa4": parse_hf_config(config_dict(64, 96, 3, 8, 2, 128, True, 2, 32)),
}
QWEN_72B = parse_hf_config({**config_dict(8192, 29568, 80, 64, 8, 152064, False, 32, 1280),
                            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}})


@pytest.mark.parametrize("name, tp", [("untied_gqa2", 2), ("untied_gqa2", 4), ("tied_gqa4", 2)])
def test_gathered_shards_give_the_conversion_rules_hf_tensors(name, tp):
    """Rank r's shard (convert.tp.split_for_rank) -> to_parts -> gathered in rank order -> assembled
    equals megatron_to_hf of the full tensor, for every parameter, exactly."""
    cfg = SMALL[name]
    generator = torch.Generator().manual_seed(0)
    for rule in all_rules(cfg, TRANSFORMERS5):
        full = torch.randn(rule.megatron_shape, generator=generator)
        shards = [split_for_rank(full, rule.layout, rule.tp_dim, r, tp, rule.megatron_name) for r in range(tp)]
        for shard in shards:
            assert tuple(shard.shape) == shard_shape(rule, tp)
        expected = megatron_to_hf(rule.megatron_name, full, cfg, TRANSFORMERS5)
        if not rule.exported:
            assert expected == []
            continue
        # the same as merging the shards with the conversion tools, then converting
        merged = megatron_to_hf(rule.megatron_name, merge_ranks(shards, rule.layout, rule.tp_dim), cfg, TRANSFORMERS5)
        for part_index, (hf_name, want) in enumerate(expected):
            assert merged[part_index][0] == hf_name and torch.equal(merged[part_index][1], want)
            if rule.tp_dim is None:
                assert torch.equal(rule.layout.to_parts(shards[0])[part_index], want), hf_name
                continue
            gathered = torch.stack([rule.layout.to_parts(shard)[part_index].contiguous() for shard in shards])
            assert torch.equal(assemble_hf_part(gathered, rule.tp_dim), want), hf_name
            if rule.tp_dim == 0:  # what all_gather_into_tensor writes straight into the bucket
                assert torch.equal(gathered.reshape(want.shape), want), hf_name


def test_reload_groups_follow_the_engines_fused_modules():
    layer = "model.language_model.layers.3."
    assert {reload_group(f"{layer}self_attn.{p}_proj.{k}") for p in "qkv" for k in ("weight", "bias")} == {
        f"{layer}self_attn.qkv_proj"
    }
    assert reload_group(f"{layer}mlp.gate_proj.weight") == reload_group(f"{layer}mlp.up_proj.weight")
    assert reload_group(f"{layer}mlp.down_proj.weight") != reload_group(f"{layer}mlp.up_proj.weight")
    vision = "visual.blocks.0.mlp."
    assert reload_group(f"{vision}gate_proj.bias") == reload_group(f"{vision}up_proj.weight")
    assert reload_group("visual.blocks.0.attn.proj.weight") == reload_group("visual.blocks.0.attn.proj.bias")
    assert reload_group("visual.merger.mlp.0.weight") != reload_group("visual.merger.mlp.2.weight")


def stage_of_72b(rule, pp: int) -> int:
    name = rule.megatron_name
    if name.startswith("language_model.decoder.layers."):
        return int(name.split(".")[3]) * pp // QWEN_72B.text.num_layers
    last = name.startswith(("language_model.decoder.final_layernorm", "language_model.output_layer"))
    return pp - 1 if last else 0


@pytest.mark.parametrize("bucket_mb", [64, 512, 2048])
def test_bucket_plan_of_the_72b_model(bucket_mb):
    pp, bucket_bytes, element_size = 4, bucket_mb << 20, 2
    owned = sorted(((rule, stage_of_72b(rule, pp)) for rule in checkpoint_rules(QWEN_72B, RELEASED)),
                   key=lambda pair: pair[1])
    plans = plan_buckets(owned, bucket_bytes, element_size)
    names = [e.name for plan in plans for e in plan.entries]
    expected = [name for rule, _ in owned for name in rule.hf_names]
    assert names == expected  # every tensor once, in order
    stage_of = {rule.megatron_name: stage for rule, stage in owned}
    group_bucket: dict[str, int] = {}
    for index, plan in enumerate(plans):
        assert {stage_of[rule.megatron_name] for rule in plan.rules} == {plan.stage}
        offset = 0
        for entry in plan.entries:
            assert entry.offset == offset
            offset += entry.numel
            # a reload group lives in exactly one bucket
            assert group_bucket.setdefault(reload_group(entry.name), index) == index, entry.name
        assert plan.numel == offset
        groups = {reload_group(e.name) for e in plan.entries}
        assert plan.numel * element_size <= bucket_bytes or len(groups) == 1
    if bucket_mb == 64:  # tensors larger than a bucket (embedding, output layer, each fc1) travel alone
        assert max(plan.numel for plan in plans) == max(math.prod(rule.megatron_shape) for rule, _ in owned)
        fc1 = [plan for plan in plans if plan.rules[0].megatron_name.endswith(".mlp.linear_fc1.weight")]
        assert len(fc1) == 80 and all(len(plan.rules) == 1 and len(plan.entries) == 2 for plan in fc1)


def test_bucket_plan_rejects_a_non_positive_size():
    owned = [(rule, 0) for rule in checkpoint_rules(SMALL["untied_gqa2"], RELEASED)]
    with pytest.raises(ValueError, match="at least 1 byte"):
        plan_buckets(owned, 0, 4)


def test_stage_assignment_and_its_errors():
    cfg = SMALL["tied_gqa4"]
    rules = checkpoint_rules(cfg, RELEASED)
    on_last = ("layers.2.", "final_layernorm")
    first = [r.megatron_name for r in rules if not any(part in r.megatron_name for part in on_last)]
    last = [r.megatron_name for r in rules if r.megatron_name not in first]
    last.append("language_model.output_layer.weight")  # the tied copy on the last stage is not exported
    owned = assign_stages([first, last], cfg, RELEASED)
    assert [rule.megatron_name for rule, _ in owned] == first + last[:-1]
    assert [stage for _, stage in owned] == [0] * len(first) + [1] * (len(last) - 1)
    with pytest.raises(ValueError, match="'language_model.decoder.final_layernorm.weight' is on no pipeline stage"):
        assign_stages([first, last[:-2]], cfg, RELEASED)
    embedding = "language_model.embedding.word_embeddings.weight"
    with pytest.raises(ValueError, match=f"'{embedding}' is on pipeline stages 0 and 1"):
        assign_stages([first, last + [embedding]], cfg, RELEASED)


def test_local_shards_name_the_tensor_of_the_wrong_shape():
    cfg = SMALL["untied_gqa2"]
    rule = next(r for r in checkpoint_rules(cfg, RELEASED) if r.megatron_name.endswith("0.mlp.linear_fc2.weight"))
    good = torch.zeros(shard_shape(rule, 2))
    assert shard_shape(rule, 2) == (64, 48)
    assert local_shards([(rule.megatron_name, good)], cfg, RELEASED, 2)[rule.megatron_name] is good
    with pytest.raises(ValueError, match=rf"'{rule.megatron_name}' has shape \(64, 96\)"):
        local_shards([(rule.megatron_name, torch.zeros(64, 96))], cfg, RELEASED, 2)
    with pytest.raises(ValueError, match="no HF conversion rule for Megatron tensor 'vision_model.extra.weight'"):
        local_shards([("vision_model.extra.weight", good)], cfg, RELEASED, 2)


def test_bucket_views_are_views_of_the_flat_buffer():
    entries = (TensorEntry("a", (2, 3), 0), TensorEntry("b", (4,), 6))
    bucket = Bucket(torch.arange(10.0), entries)
    (name_a, a), (name_b, b) = bucket.named_tensors()
    assert (name_a, name_b) == ("a", "b") and bucket.num_bytes == 40
    assert torch.equal(a, torch.arange(6.0).view(2, 3)) and torch.equal(b, torch.arange(6.0, 10.0))
    assert a.data_ptr() == bucket.flat.data_ptr()
    with pytest.raises(ValueError, match="cannot hold its tensors"):
        bucket_views(torch.zeros(9), entries)


def test_export_dtype_resolution(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert resolve_export_dtype("float32", "bfloat16", tmp_path) is torch.float32
    assert resolve_export_dtype("auto", "float16", tmp_path) is torch.float16
    assert resolve_export_dtype("auto", "auto", tmp_path) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown export dtype 'fp8'"):
        resolve_export_dtype("fp8", "auto", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"dtype": "float32"}}))
    assert resolve_export_dtype("auto", "auto", tmp_path) is torch.float32
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="set weights.dtype explicitly"):
        resolve_export_dtype("auto", "auto", tmp_path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("bucket_mb", 0, "weights.bucket_mb must be at least 1"),
        ("probe_max_tokens", 0, "weights.probe_max_tokens must be at least 1"),
        ("probe_every", -1, "weights.probe_every must be >= 0"),
        ("dtype", "fp16", "weights.dtype must be one of"),
        ("probe_warn_mean_abs_diff", 0.0, "weights.probe_warn_mean_abs_diff must be > 0"),
    ],
)
def test_weights_config_names_the_bad_key(field, value, message):
    WeightsConfig().validate()
    cfg = WeightsConfig(**{field: value})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_bucket_plan_sizes_are_whole_hf_tensors():
    cfg = SMALL["untied_gqa2"]
    owned = [(rule, 0) for rule in checkpoint_rules(cfg, RELEASED)]
    plans = plan_buckets(owned, 1, 4)  # every reload group alone
    total = sum(math.prod(rule.megatron_shape) for rule, _ in owned)
    assert sum(plan.numel for plan in plans) == total
    assert len(plans) == len({reload_group(rule.hf_names[0]) for rule, _ in owned})
