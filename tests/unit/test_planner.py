"""The parallelism planner (trainer/planner.py, tools/plan_parallelism.py): memory of a hand-sized model at several
layouts and recompute modes against arithmetic written out here, FLOPs per token, step time, the ranking, bad
input, and the command line (pure, no torch)."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_minio3.config import load_config
from megatron_minio3.trainer.launch_plan import (
    LOGITS_COMPONENT,
    GiB,
    build_launch_plan,
    check_launch_plan,
    read_model_dims,
    recompute_mode,
)
from megatron_minio3.trainer.planner import (
    CP_CAVEAT,
    FlopsPerToken,
    Layout,
    PlannerSettings,
    StepTimeModel,
    candidate_layouts,
    flops_per_token_parts,
    model_flops_per_token,
    plan_parallelism,
    recompute_factors,
    recompute_overrides,
    step_seconds,
)

from tests.unit.test_launch_plan import CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT

REPO = Path(__file__).resolve().parents[2]

# A hand-sized Qwen2.5-VL: hidden 64, 2 layers, 4 heads of 16 (2 KV heads), FFN 128, vocab 128; a vision tower of
# 2 blocks, hidden 32 (2 heads), FFN 64, one full-attention block, projecting to 64.
TINY = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "torch_dtype": "bfloat16",
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 128, "tie_word_embeddings": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "vision_config": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "out_hidden_size": 64,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3,
                      "window_size": 112, "fullatt_block_indexes": [1]},
}
# Parameters (launch_plan.count_parameters' rules):
#   attention  (64*64 + 64) + 2*(64*32 + 32) + 64*64 = 4160 + 4160 + 4096 = 12416
#   layer      12416 + 3*64*128 (gate, up, down) + 2*64 (norms) = 37120
#   embedding = lm_head = 128*64 = 8192; final norm 64
#   vision block (32*96 + 96) + (32*32 + 32) + 2*(32*64 + 64) + (64*32 + 32) + 2*32 = 10592
#   patch embedding 3*2*14*14*32 = 37632; tower 37632 + 2*10592 = 58816
#   merger 32 + 128*128 + 128 + 128*64 + 64 = 24800
LAYER, EMBED, NORM, TOWER, MERGER = 37120, 8192, 64, 58816, 24800
TOTAL = EMBED + 2 * LAYER + NORM + EMBED + TOWER + MERGER  # 174304
SEQ, FRACTION = 4096, 0.25  # micro-batch tokens; image tokens are a quarter of them


def tiny_plan(num_gpus=2, gpu_memory_gb=100.0, colocated=False, base=None, **kwargs):
    settings = PlannerSettings(num_gpus=num_gpus, gpu_memory_gb=gpu_memory_gb, seq_len=SEQ, colocated=colocated,
                               image_fraction=FRACTION, image_pixels=256 * 14 * 14, **kwargs)
    return plan_parallelism(TINY, settings, base)


def selective_base(modules: list[str]):
    """The config defaults with selective recompute of `modules` (what the planner's "selective" mode reruns)."""
    return load_config(None, ["actor.recompute_activations=true", "actor.recompute_granularity=selective",
                              f"actor.recompute_modules=[{','.join(modules)}]"])


def estimate(plan, layout: str):
    return next(e for e in plan.estimates if str(e.layout) == layout)


def test_candidate_layouts_multiply_to_the_gpus():
    layouts = candidate_layouts(8)
    assert all(x.world_size == 8 for x in layouts) and len(set(layouts)) == len(layouts)
    assert len(layouts) == 20  # ordered factorisations of 2^3 into 4 factors: C(3 + 3, 3)
    assert Layout(2, 1, 1, 4) in layouts and Layout(1, 2, 2, 2) in layouts


def test_every_layout_of_two_gpus_splits_the_tiny_model():
    plan = tiny_plan()
    assert [str(e.layout) for e in plan.estimates] == ["tp1 pp1 cp1 dp2", "tp1 pp1 cp2 dp1", "tp1 pp2 cp1 dp1",
                                                       "tp2 pp1 cp1 dp1"]
    assert plan.params.total == TOTAL == 174304 and not plan.left_out


def test_state_memory_by_hand():
    plan = tiny_plan()
    # tp1 pp1 dp2: everything on one GPU; bf16 params 2 B, fp32 grads 4 B, Adam 12 B / (dp*cp = 2)
    c = estimate(plan, "tp1 pp1 cp1 dp2").train_components["none"]
    assert (c["actor params"], c["actor grads (fp32)"], c["actor optimizer (dp*cp shard)"]) == (
        TOTAL * 2, TOTAL * 4, TOTAL * 12 // 2)
    # tp2: layers, embedding and lm_head split over 2, the final norm and the vision tower + merger replicated
    tp2 = 2 * LAYER / 2 + EMBED / 2 + EMBED / 2 + NORM + TOWER + MERGER  # 128992
    c = estimate(plan, "tp2 pp1 cp1 dp1").train_components["none"]
    assert (c["actor params"], c["actor grads (fp32)"], c["actor optimizer (dp*cp shard)"]) == (
        tp2 * 2, tp2 * 4, tp2 * 12)
    # pp2: stage 0 has a layer, the embedding and the vision tower (the larger); stage 1 a layer, lm_head, norm
    stage0, stage1 = LAYER + EMBED + TOWER + MERGER, LAYER + EMBED + NORM  # 128928, 45376
    c = estimate(plan, "tp1 pp2 cp1 dp1").train_components["none"]
    assert c["actor params"] == max(stage0, stage1) * 2 == 257856
    assert c["actor optimizer (dp*cp shard)"] == stage0 * 12


# Activations per token and layer without recompute, bytes (bf16): 2 * (6*64 + 2*2*16 + 3*128) = 1664, + the fp32
# softmax log-sum-exp 4 * 4 heads = 16 -> 1680. Selective recompute frees, per module: core_attn the log-sum-exp
# (16); mlp fc1's output and fc2's input, 2 * 3*128 = 768; layernorm the two norm outputs, 2 * 2*64 = 256.
# Vision (tp1): patches per micro-batch 4 * 0.25 * 4096 = 4096; per block 4096 * 2 * (8*32 + 3*64) = 3670016; blocks
# rerun whole under either granularity, keeping their input: 4096 * 2 * 32 each. Logits: the bf16 logits and
# their gradient, 2 * 4096 * 128 * 2 B, plus the log-prob function's two fp32 chunks of min(4096, 128) columns.
PER_TOKEN_LAYER, VISION_BLOCK, LOGITS = 1680, 3670016, 2 * 4096 * 128 * 2 + 8 * 4096 * 128
VISION_RECOMPUTED = 2 * SEQ * 2 * 32 + VISION_BLOCK  # block inputs (4096 patches x hv x 2 blocks) + one block's set


@pytest.mark.parametrize("mode, decoder, vision", [
    ("none", 2 * SEQ * PER_TOKEN_LAYER, 2 * VISION_BLOCK),  # 2 layers, 2 blocks, everything kept
    ("selective", 2 * SEQ * (1680 - 16 - 768), VISION_RECOMPUTED),  # default modules core_attn, mlp: 896 a token
    ("full", 2 * SEQ * 2 * 64 + SEQ * PER_TOKEN_LAYER, VISION_RECOMPUTED),  # layer inputs + one layer's full set
])
def test_activations_per_recompute_mode_by_hand(mode, decoder, vision):
    c = estimate(tiny_plan(), "tp1 pp1 cp1 dp2").train_components[mode]
    assert (c["activations (decoder)"], c["activations (vision tower)"]) == (decoder, vision)
    assert c[LOGITS_COMPONENT] == LOGITS


@pytest.mark.parametrize("modules, per_token_layer", [
    (["core_attn"], 1680 - 16),  # = 2 * (6*64 + 2*32 + 3*128): q, k, v stay (the checkpoint's inputs)
    (["mlp"], 1680 - 768),  # = 2 * (6*64 + 2*32) + 16: the MLP keeps only its input, the pre-MLP norm's output
    (["layernorm"], 1680 - 256),  # = 2 * (4*64 + 2*32 + 3*128) + 16: the norm inputs stay, their outputs go
    (["core_attn", "mlp", "layernorm"], 1680 - 16 - 768 - 256),  # = 640 = 2 * (4*64 + 2*32)
])
def test_selective_recompute_follows_the_configs_modules(modules, per_token_layer):
    plan = tiny_plan(base=selective_base(modules))
    assert plan.recompute_modules == tuple(modules)
    c = estimate(plan, "tp1 pp1 cp1 dp2").train_components["selective"]
    assert c["activations (decoder)"] == 2 * SEQ * per_token_layer
    assert c["activations (vision tower)"] == VISION_RECOMPUTED  # whatever the modules


def test_activations_at_tp2_and_pp2_by_hand():
    plan = tiny_plan()
    c = estimate(plan, "tp2 pp1 cp1 dp1").train_components["none"]
    # sequence-parallel TP halves the decoder's activations and the logits' vocab slice; the vision tower's too,
    # since each image is encoded on one rank of the TP group: 4096 / 2 = 2048 patches a rank, per block
    # 2048 * 2 * (8*32 + 3*64) = 1835008 = VISION_BLOCK / 2, over 2 blocks
    assert c["activations (decoder)"] == 2 * SEQ * (2 * (6 * 64 + 2 * 2 * 16 + 3 * 128) / 2 + 4 * 4 / 2)
    assert (c["activations (vision tower)"], c[LOGITS_COMPONENT]) == (2 * 1835008, LOGITS // 2)
    full = estimate(plan, "tp2 pp1 cp1 dp1").train_components["full"]  # block inputs of 2048 patches + one block's set
    assert full["activations (vision tower)"] == 2 * 2048 * 2 * 32 + 1835008 == VISION_RECOMPUTED // 2
    # 1F1B: stage 0 of 2 keeps 2 micro-batches in flight (of its 1 layer and the vision tower), stage 1 one
    c = estimate(plan, "tp1 pp2 cp1 dp1").train_components["none"]
    assert c["activations (decoder)"] == 2 * 1 * SEQ * PER_TOKEN_LAYER  # stage 0's, the larger
    assert c["activations (vision tower)"] == 2 * 2 * VISION_BLOCK
    assert c[LOGITS_COMPONENT] == LOGITS  # on stage 1
    train = next(m for m in plan.estimates[2].phases["none"] if m.phase == "train")
    assert train.where == "actor GPU, pipeline stage 0"
    assert train.total == (2 * (LAYER + EMBED + TOWER + MERGER) * (2 + 4 + 12) // 2 + 2 * SEQ * PER_TOKEN_LAYER
                           + 4 * VISION_BLOCK + 2 * GiB)  # params + grads + optimizer, activations, CUDA context


# cp2: 2048 tokens a rank; each layer's attention also keeps the other rank's keys and values it gathered,
# 2 B * 2 * 32 * (2 - 1) = 128 bytes per local token, unless core attention is recomputed.
@pytest.mark.parametrize("mode, decoder", [
    ("none", 2 * 2048 * (1680 + 128)),
    ("selective", 2 * 2048 * (1680 + 128 - (16 + 128) - 768)),  # = 2 * 2048 * 896: exactly half of cp1's
    ("full", 2 * 2048 * 2 * 64 + 2048 * (1680 + 128)),
])
def test_context_parallel_halves_the_activations_and_keeps_the_gathered_keys(mode, decoder):
    plan = tiny_plan()
    cp1 = estimate(plan, "tp1 pp1 cp1 dp2").train_components[mode]
    cp2 = estimate(plan, "tp1 pp1 cp2 dp1").train_components[mode]
    assert cp2["activations (decoder)"] == decoder
    for part in ("activations (vision tower)", LOGITS_COMPONENT):
        assert cp2[part] * 2 == cp1[part]
    assert cp2["actor optimizer (dp*cp shard)"] == cp1["actor optimizer (dp*cp shard)"]  # sharded over dp*cp = 2
    cp_row, plain = estimate(plan, "tp1 pp1 cp2 dp1"), estimate(plan, "tp1 pp1 cp1 dp2")
    assert not cp_row.unsupported and cp_row.caveat == CP_CAVEAT  # the config takes cp > 1; not measured on GPU
    assert not plain.unsupported and not plain.caveat


def test_colocated_engine_weights_and_kv_cache_by_hand():
    plan = tiny_plan(gpu_memory_gb=10.0, colocated=True)
    assert plan.rollout_tp == 1  # the smallest engine whose KV cache holds a sequence
    rollout = next(m for m in estimate(plan, "tp1 pp1 cp1 dp2").phases["none"] if m.phase == "rollout").components
    # the whole model in bf16 per engine; KV = 0.6 x 10 GiB - weights - 4 GiB activation reserve
    assert rollout["engine weights"] == TOTAL * 2
    assert rollout["engine KV cache"] == int(0.6 * 10 * GiB) - TOTAL * 2 - 4 * GiB
    assert rollout["actor state (not offloaded)"] == 0  # the colocated default offloads it to host
    # KV bytes per token: 2 (k, v) x 2 layers x 2 heads x 16 x 2 B = 256
    assert plan.kv_cache_tokens_per_engine == rollout["engine KV cache"] // 256


def test_flops_per_token_by_hand():
    d = read_model_dims(TINY)
    parts = flops_per_token_parts(d, 100, image_fraction=0.5, patches_per_image=256)
    assert parts.decoder_dense == 6 * 2 * LAYER  # 445440
    assert parts.decoder_attention == 12 * 2 * 64 * 50  # causal: the context averages 100 / 2
    assert parts.lm_head == 6 * 128 * 64
    # the MLPs' part of the decoder matmuls: 6 * 2 layers * 3 * 64 * 128 = 294912, i.e. decoder_dense times the
    # MLP's share of a layer's parameters, 3*64*128 / 37120 = 24576 / 37120 (attention projections 12416, norms 128)
    assert parts.decoder_mlp == 6 * 2 * 3 * 64 * 128 == parts.decoder_dense * 24576 / 37120 == 294912
    # window blocks attend over (112 / 14)^2 = 64 patches, the full-attention block over all 256 of the image
    per_patch = 6 * TOWER + 12 * 32 * (1 * 64 + 1 * 256)  # 475776
    assert parts.vision == 0.5 * (4 * per_patch + 6 * MERGER)  # 4 patches per image token, merger per token
    assert model_flops_per_token(d, 100, image_fraction=0.5, patches_per_image=256) == parts.total == 1597344
    full = flops_per_token_parts(d, 100, image_fraction=0.5, patches_per_image=256, causal=False)
    assert full.decoder_attention == 2 * parts.decoder_attention
    assert model_flops_per_token(d, 100) == 6 * 2 * LAYER + 12 * 2 * 64 * 50 + 6 * 128 * 64  # no images


def test_flops_of_the_7b_decoder_match_its_published_non_embedding_size():
    d = read_model_dims(QWEN2_5_VL_7B_INSTRUCT)
    parts = flops_per_token_parts(d, 4096)
    assert abs(parts.decoder_dense / 6 - 6.53e9) / 6.53e9 < 0.005  # Qwen2.5-7B: 6.53B non-embedding parameters


def test_flops_bad_input_names_the_argument():
    d = read_model_dims(TINY)
    with pytest.raises(ValueError, match="patches_per_image"):
        model_flops_per_token(d, 100, image_fraction=0.5)
    with pytest.raises(ValueError, match="seq_len"):
        model_flops_per_token(d, 0)
    with pytest.raises(ValueError, match="image_fraction"):
        model_flops_per_token(d, 10, image_fraction=1.5, patches_per_image=4)


def test_step_time_by_hand():
    parts = FlopsPerToken(decoder_dense=600.0, decoder_attention=300.0, lm_head=60.0, vision=90.0)
    model = StepTimeModel(peak_flops=1000.0, mfu=0.5, global_batch=10, tp_comm_penalty=0.1, cp_comm_penalty=0.2)
    # tp2 pp1 cp1 dp2, none: m = 10 / 2 = 5; per token 900 / 2 + 90 / 2 + 60 / 2 = 525 FLOPs (the images are
    # shared out over TP, so vision divides by tp as the decoder and lm_head do); 8 tokens at 500 FLOP/s
    assert step_seconds(parts, Layout(2, 1, 1, 2), "none", 8, model) == pytest.approx(5 * 8 * 525 / 500 * 1.1)
    # tp1 pp2 cp2 dp1, full: m = 10; stage 0 = 900 * 4/3 / 2 + 90 * 4/3 = 720, stage 1 = 600 + 60; 4 tokens a rank
    assert step_seconds(parts, Layout(1, 2, 2, 1), "full", 8, model) == pytest.approx((10 + 1) * 4 * 720 / 500 * 1.2)
    # selective reruns the vision blocks whole (x 4/3) and core attention's forward (300 / 3); decoder_mlp is 0 here
    assert step_seconds(parts, Layout(1, 1, 1, 1), "selective", 8, model) == pytest.approx(
        10 * 8 * (900 + 100 + 60 + 120) / 500)


def test_selective_recompute_step_time_by_hand():
    d = read_model_dims(TINY)
    parts = flops_per_token_parts(d, 100, image_fraction=0.5, patches_per_image=256)
    # per token (test_flops_per_token_by_hand): dense D = 6*2*37120 = 445440, attention A = 12*2*64*50 = 76800,
    # MLP M = 6*2*3*64*128 = 294912, lm_head 6*128*64 = 49152, vision V = 0.5 * (4*475776 + 6*24800) = 1025952
    assert (parts.decoder_dense, parts.decoder_attention, parts.decoder_mlp, parts.lm_head, parts.vision) == (
        445440, 76800, 294912, 49152, 1025952)
    # core_attn + mlp: one more forward of each, A/3 + M/3 = 25600 + 98304; decoder (522240 + 123904) / 522240
    assert recompute_factors(parts, "selective", ["core_attn", "mlp"]) == (646144 / 522240, 4 / 3)
    assert recompute_factors(parts, "selective", ["layernorm"]) == (1.0, 4 / 3)  # norms: no matmul FLOPs
    assert recompute_factors(parts, "selective", ["core_attn"]) == ((522240 + 25600) / 522240, 4 / 3)
    # tp2 pp1 cp1 dp1, 4 micro-batches of 100 tokens, 1e9 FLOP/s x MFU 0.5, TP penalty 0.1:
    # per token 646144/2 + 1025952 * 4/3 / 2 + 49152/2 = 323072 + 683968 + 24576 = 1031616 FLOPs
    # t = 4 * 100 * 1031616 / 5e8 * (1 + 0.1) = 0.8252928 * 1.1 = 0.90782208 s
    model = StepTimeModel(peak_flops=1e9, mfu=0.5, global_batch=4, tp_comm_penalty=0.1)
    assert step_seconds(parts, Layout(2, 1, 1, 1), "selective", 100, model, ["core_attn", "mlp"]) == pytest.approx(
        0.90782208, rel=1e-12)
    # full at the same layout: (522240 * 4/3)/2 + 683968 + 24576 = 348160 + 708544 = 1056704; selective is cheaper
    assert step_seconds(parts, Layout(2, 1, 1, 1), "full", 100, model) == pytest.approx(
        4 * 100 * 1056704 / 5e8 * 1.1, rel=1e-12)
    with pytest.raises(ValueError, match="recompute modules"):
        recompute_factors(parts, "selective", ["attention"])


@pytest.mark.parametrize("base", [[], ["actor.recompute_activations=true"],
                                  ["actor.recompute_activations=true", "actor.recompute_granularity=selective",
                                   "actor.recompute_modules=[layernorm]"]])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_recompute_overrides_set_the_mode_on_any_base(base, mode):
    actor = load_config(None, base).actor
    cfg = load_config(None, base + recompute_overrides(mode, actor))  # validates
    assert recompute_mode(cfg) == mode
    if mode == "selective":
        assert cfg.actor.recompute_modules == actor.recompute_modules  # the base's modules stay
    assert recompute_overrides("selective", load_config(None).actor) == [
        "actor.recompute_activations=true", "actor.recompute_granularity=selective"]
    assert recompute_overrides("selective", selective_base(["core_attn", "layernorm"]).actor) == [
        "actor.recompute_activations=true", "actor.recompute_granularity=selective",
        "actor.recompute_modules=[core_attn,layernorm]"]


def test_ranking_excludes_what_does_not_fit_and_puts_the_fastest_first():
    roomy = tiny_plan()
    least = {str(e.layout): min(e.peak(m) for m in ("none", "selective", "full")) for e in roomy.estimates}
    biggest = max(least, key=least.get)
    budget = (least[biggest] + max(v for k, v in least.items() if k != biggest)) / 2  # only `biggest` is over
    plan = tiny_plan(gpu_memory_gb=budget / GiB / 0.9)  # 10% headroom: the budget is 90% of the GPU
    ranked = plan.ranked()
    assert biggest not in [str(r.estimate.layout) for r in ranked] and len(ranked) == 3
    seconds = [r.step_seconds for r in ranked]
    assert seconds == sorted(seconds)
    for r in ranked:  # each with its fastest mode that fits
        fitting = [m for m in ("none", "selective", "full") if r.estimate.peak(m) <= plan.settings.budget_bytes]
        assert r.recompute in fitting and r.step_seconds == min(r.estimate.step_seconds[m] for m in fitting)
    best = plan.recommended()
    assert best == ranked[0]  # cp > 1 rows included: the config takes every layout
    assert all((r.caveat == CP_CAVEAT) == (r.estimate.layout.cp > 1) for r in ranked)
    assert plan.recommended(max_cp=1) == next(r for r in ranked if r.estimate.layout.cp == 1)


def test_nothing_fits_a_tiny_gpu():
    plan = tiny_plan(gpu_memory_gb=1.0)  # the 2 GiB CUDA context alone is over
    assert plan.ranked() == [] and plan.recommended() is None


def test_bad_settings_name_the_flag():
    with pytest.raises(ValueError, match=r"--gpus\) 12 spans nodes of gpus_per_node \(--gpus-per-node\) 8"):
        tiny_plan(num_gpus=12)
    with pytest.raises(ValueError, match=r"--gpus\) must be >= 1"):
        tiny_plan(num_gpus=0)
    with pytest.raises(ValueError, match=r"--headroom"):
        tiny_plan(headroom=1.0)
    with pytest.raises(ValueError, match=r"--mfu"):
        tiny_plan(time=StepTimeModel(mfu=0.0))


def test_a_config_missing_a_key_names_it():
    broken = copy.deepcopy(TINY)
    del broken["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        plan_parallelism(broken, PlannerSettings(num_gpus=2, gpu_memory_gb=80, seq_len=64))


def test_layouts_that_do_not_split_are_left_out_with_the_reason():
    plan = tiny_plan(num_gpus=8)  # 4 heads, 2 KV heads, 2 layers
    assert "tp8 pp1 cp1 dp1" in plan.left_out and "tp4 pp1 cp1 dp2" in plan.left_out
    assert any("num_key_value_heads=2" in r for r in plan.left_out["tp4 pp1 cp1 dp2"])
    assert any("does not divide num_hidden_layers=2" in r for r in plan.left_out["tp1 pp4 cp1 dp2"])
    assert all(e.layout.tp <= 2 and e.layout.pp <= 2 for e in plan.estimates)


@pytest.mark.parametrize("max_cp", [None, 1])
def test_the_7b_recommendation_passes_the_trainers_launch_plan(max_cp):
    settings = PlannerSettings(num_gpus=8, gpu_memory_gb=80, seq_len=16384, colocated=True)
    base = load_config(CONFIG_7B)
    best = plan_parallelism(QWEN2_5_VL_7B_INSTRUCT, settings, base).recommended(max_cp)
    layout = best.estimate.layout
    assert max_cp is None or layout.cp == 1
    cfg = load_config(CONFIG_7B, [f"parallel.tp={layout.tp}", f"parallel.pp={layout.pp}", f"parallel.cp={layout.cp}",
                                  f"parallel.dp={layout.dp}", *recompute_overrides(best.recompute, base.actor),
                                  "actor.packing.max_tokens_per_microbatch=16384", "rollout.max_total_tokens=16384",
                                  "rollout.max_tokens_per_turn=8192"])
    assert recompute_mode(cfg) == best.recompute
    launch = build_launch_plan(cfg, QWEN2_5_VL_7B_INSTRUCT)  # the config's own recompute settings, not a mode
    check_launch_plan(launch)
    assert max(m.total for m in launch.phases) == best.peak_bytes <= 0.9 * 80 * GiB


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / "plan_parallelism.py"), *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_prints_a_ranked_table(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    done = _cli("--model", str(tmp_path), "--gpus", "2", "--gpu-mem", "10", "--seq-len", str(SEQ), "--colocated",
                "--image-fraction", str(FRACTION))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "colocated vLLM engines of TP 1" in out and "eng.w" in out and "KV" in out
    assert "train n/s/f" in out and "step s n/s/f" in out
    ranked = out[out.index("ranked: 4 of 4 layouts fit"):].splitlines()
    assert ranked[1].split()[:3] == ["#", "layout", "recompute"]
    rows = [line.split() for line in ranked[2:6]]
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]
    seconds = [float(row[6]) for row in rows]
    assert seconds == sorted(seconds)
    assert "recommended for the configs: parallel: {tp:" in out and "actor.recompute_activations=" in out
    assert "recompute modes none / selective (core_attn, mlp; vision blocks whole) / full" in out


def test_cli_refuses_bad_input(tmp_path):
    done = _cli("--model", str(tmp_path / "missing.json"), "--gpus", "2", "--gpu-mem", "80", "--seq-len", "64")
    assert done.returncode == 2 and "no HF config.json there" in done.stderr
    broken = {k: v for k, v in TINY.items() if k != "hidden_size"}
    (tmp_path / "config.json").write_text(json.dumps(broken))
    done = _cli("--model", str(tmp_path / "config.json"), "--gpus", "2", "--gpu-mem", "80", "--seq-len", "64")
    assert done.returncode == 2 and "missing key 'hidden_size'" in done.stderr and str(tmp_path) in done.stderr
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    done = _cli("--model", str(tmp_path), "--gpus", "12", "--gpu-mem", "80", "--seq-len", "64")
    assert done.returncode == 2 and "not divisible" in done.stderr
