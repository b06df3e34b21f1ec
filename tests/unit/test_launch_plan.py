"""The pre-launch plan: placement, parameter counts and per-phase memory of the shipped 7B and 32B configs on the
released Qwen2.5-VL dimensions, and the clear refusals of layouts that cannot run (pure, no torch)."""
import copy
import json
from pathlib import Path

import pytest

from megatron_minio3.config import load_config
from megatron_minio3.models.qwen2_5_vl.config import parse_hf_config
from megatron_minio3.trainer.launch_plan import (
    GiB,
    build_launch_plan,
    check_launch_plan,
    count_parameters,
    dry_run,
    format_launch_plan,
    read_model_dims,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CONFIG_7B = CONFIGS / "qwen2_5_vl_7b_grpo.yaml"
CONFIG_32B = CONFIGS / "qwen2_5_vl_32b_grpo.yaml"

# config.json of Qwen/Qwen2.5-VL-7B-Instruct as released (transformers 4.x layout: text fields at the top level).
QWEN2_5_VL_7B_INSTRUCT = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}

# Qwen/Qwen2.5-VL-32B-Instruct: the Qwen2.5-32B text dimensions, the same vision tower projecting to 5120.
QWEN2_5_VL_32B_INSTRUCT = copy.deepcopy(QWEN2_5_VL_7B_INSTRUCT)
QWEN2_5_VL_32B_INSTRUCT.update(
    hidden_size=5120, intermediate_size=27648, num_attention_heads=40, num_hidden_layers=64, num_key_value_heads=8,
    max_window_layers=64,
)
QWEN2_5_VL_32B_INSTRUCT["vision_config"]["out_hidden_size"] = 5120

# What the shipped configs need on top to fit 80 GiB under this model (see test_*_config_as_written_*).
FIT_7B = ["rollout.enable_sleep_mode=true", "actor.recompute_activations=true"]
FIT_32B = ["rollout.enable_sleep_mode=true"]
PP2_32B = ["parallel.pp=2", "parallel.dp=1"]  # the 32B config's earlier layout: TP8 x PP2 on the 16 GPUs


def plan_for(path, hf, overrides=(), **kwargs):
    return build_launch_plan(load_config(path, list(overrides)), hf, **kwargs)


def rejection(path, hf, overrides) -> str:
    plan = plan_for(path, hf, overrides)
    with pytest.raises(ValueError) as err:
        check_launch_plan(plan)
    return str(err.value)


def test_the_test_configs_are_valid_qwen2_5_vl_configs():
    for hf in (QWEN2_5_VL_7B_INSTRUCT, QWEN2_5_VL_32B_INSTRUCT):
        parsed = parse_hf_config(hf)  # the model code's own reader accepts them (mrope vs head dim, widths)
        assert parsed.vision.out_hidden_size == parsed.text.hidden_size


@pytest.mark.parametrize("hf, published", [(QWEN2_5_VL_7B_INSTRUCT, 8.29e9), (QWEN2_5_VL_32B_INSTRUCT, 33.5e9)])
def test_parameter_counts_match_the_published_totals(hf, published):
    counts = count_parameters(read_model_dims(hf))
    assert abs(counts.total - published) / published < 0.01
    assert 0.67e9 < counts.vision < 0.69e9  # vision tower + merger, ~0.68B in both


def test_exact_counts_of_the_7b():
    counts = count_parameters(read_model_dims(QWEN2_5_VL_7B_INSTRUCT))
    assert counts.language_model == 7_615_616_512  # Qwen2.5-7B: 7.62B
    assert counts.vision == 676_550_144
    assert counts.total == 8_292_166_656


def test_transformers_5_layout_reads_the_same_dims():
    flat = QWEN2_5_VL_7B_INSTRUCT
    text_keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                 "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps")
    nested = {k: v for k, v in flat.items() if k not in text_keys and k != "rope_scaling"}
    nested["text_config"] = {k: flat[k] for k in text_keys} | {"rope_parameters": flat["rope_scaling"]}
    assert read_model_dims(nested) == read_model_dims(flat)


def test_7b_config_fits_80gb_with_sleep_mode_and_recompute():
    plan = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B)
    check_launch_plan(plan)
    assert (plan.gpus_needed, plan.nodes_needed, len(plan.engines)) == (8, 1, 8)
    assert all(m.total <= 80 * GiB for m in plan.phases)
    assert plan.max_length_sequences_per_engine >= 1
    report = format_launch_plan(plan)
    assert "verdict: fits" in report and "ESTIMATES" in report and "phase train" in report


def test_7b_config_as_written_does_not_fit_the_train_phase():
    """No sleep mode (the engines keep weights + KV through training) and no recompute at 32k-token micro-batches."""
    message = rejection(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, ["rollout.enable_sleep_mode=false",
                                                             "actor.recompute_activations=false"])
    assert "phase 'train'" in message and "cluster.gpu_memory_gb is 80" in message
    assert "rollout.enable_sleep_mode=true" in message and "actor.recompute_activations=true" in message


def test_32b_config_fits_two_nodes_with_sleep_mode():
    plan = plan_for(CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, FIT_32B)
    check_launch_plan(plan)
    assert (plan.gpus_needed, plan.nodes_needed, len(plan.engines)) == (16, 2, 4)
    assert plan.ranks_per_node == {0: list(range(8)), 1: list(range(8, 16))}
    assert plan.engines_per_node == {0: [0, 1], 1: [2, 3]}
    assert [r.rank for r in plan.ranks if r.leads_engine] == [0, 4, 8, 12]
    assert all(m.total <= 80 * GiB for m in plan.phases)


def test_32b_config_without_sleep_mode_does_not_fit():
    message = rejection(CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, ["rollout.enable_sleep_mode=false"])
    assert "phase 'train'" in message and "rollout.enable_sleep_mode=true" in message


def test_rank_coordinates_follow_megatrons_default_order():
    plan = plan_for(CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, FIT_32B + PP2_32B)
    rank = plan.ranks[13]  # TP innermost, then CP, DP, PP
    assert (rank.tp, rank.cp, rank.dp, rank.pp, rank.node, rank.local_gpu, rank.engine) == (5, 0, 0, 1, 1, 5, 3)
    cfg = load_config(CONFIG_7B, FIT_7B + ["parallel.dp=2", "parallel.cp=2"])
    plan = build_launch_plan(cfg, QWEN2_5_VL_7B_INSTRUCT)
    assert [(r.tp, r.cp, r.dp) for r in plan.ranks[:5]] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1)]


@pytest.mark.parametrize("path, hf, overrides", [
    (CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B),
    (CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, FIT_32B),
    (CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, FIT_32B + ["rollout.tensor_parallel_size=8"]),
    (CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, FIT_32B + ["cluster.num_nodes=4", "cluster.gpus_per_node=4",
                                                     "parallel.tp=4", "parallel.pp=4"]),
])
def test_tp_groups_and_engine_groups_stay_inside_one_node(path, hf, overrides):
    plan = plan_for(path, hf, overrides)
    tp = plan.ranks[-1].tp + 1
    for first in range(0, len(plan.ranks), tp):
        assert len({r.node for r in plan.ranks[first:first + tp]}) == 1
    for engine in plan.engines:
        assert {plan.ranks[r].node for r in engine.ranks} == {engine.node}
    assert not any("straddles" in p for p in plan.problems)


def test_a_tp_group_across_nodes_is_refused():
    message = rejection(CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, FIT_32B + ["cluster.gpus_per_node=12"])
    assert "straddles nodes [0, 1]" in message and "parallel.tp=8 must divide cluster.gpus_per_node=12" in message


def test_too_few_gpus_is_refused_with_the_arithmetic():
    message = rejection(CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, FIT_32B + ["cluster.num_nodes=1"])
    assert ("the run needs 16 GPUs on 2 node(s) (parallel: tp 8 x pp 1 x cp 1 x dp 2 = 16 actor ranks, hybrid "
            "placement: engines share their GPUs) but the cluster gives cluster.num_nodes=1 x "
            "cluster.gpus_per_node=8 = 8") in message
    message = rejection(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B + ["cluster.gpus_per_node=4"])
    assert "the run needs 8 GPUs on 2 node(s)" in message and "= 4; set cluster.num_nodes=2" in message


def test_too_little_memory_names_the_phase_and_what_helps():
    message = rejection(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B + ["cluster.gpu_memory_gb=24"])
    assert "phase 'train' needs about 62.4 GiB" in message and "cluster.gpu_memory_gb is 24" in message
    assert "actor grads (fp32) 16.7" in message and "more parallel.tp or parallel.pp" in message
    assert "less than one rollout.max_total_tokens=32768 sequence" in message  # 0.6 x 24 GiB < the weights


def test_tp_that_does_not_split_the_heads_is_refused():
    message = rejection(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B + ["parallel.tp=3"])
    assert "parallel.tp=3 does not divide the model's num_attention_heads=28" in message
    assert "tp values that split this model: [1, 2, 4]" in message


def test_pp_that_does_not_split_the_layers_is_refused():
    message = rejection(CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, FIT_32B + ["parallel.pp=3", "cluster.num_nodes=3"])
    assert "parallel.pp=3 does not divide num_hidden_layers=64" in message


def test_rollout_tp_must_split_the_actor_ranks_and_the_heads():
    overrides = FIT_7B + ["parallel.tp=1", "parallel.dp=6", "rollout.tensor_parallel_size=4"]
    message = rejection(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, overrides)
    assert "the 6 actor ranks" in message and "rollout.tensor_parallel_size=4 ranks" in message
    message = rejection(CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, FIT_32B + ["rollout.tensor_parallel_size=16"])
    assert "rollout.tensor_parallel_size=16 must divide num_attention_heads=40" in message
    assert "exceeds cluster.gpus_per_node=8" in message


def test_offload_frees_the_actor_state_during_rollout():
    on = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B + ["actor.offload_to_host_between_phases=true"])
    off = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B + ["actor.offload_to_host_between_phases=false"])
    train = on.phase("train").components
    actor_state = train["actor params"] + train["actor grads (fp32)"] + train["actor optimizer (dp*cp shard)"]
    assert off.phase("rollout").total - on.phase("rollout").total == actor_state
    assert off.phase("train").total == on.phase("train").total
    assert off.phase("sync").total - on.phase("sync").total == actor_state - train["actor params"]
    assert "actor.offload_to_host_between_phases=true" in "\n".join(off.problems)  # 7B rollout then needs ~88 GiB


def test_sleep_mode_frees_the_engine_outside_rollout():
    awake = plan_for(CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, ["rollout.enable_sleep_mode=false"])
    asleep = plan_for(CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, ["rollout.enable_sleep_mode=true"])
    engine = asleep.phase("rollout").components
    assert awake.phase("rollout").total == asleep.phase("rollout").total
    engine_state = engine["engine weights"] + engine["engine KV cache"]
    assert awake.phase("train").total - asleep.phase("train").total == engine_state
    assert awake.phase("sync").total - asleep.phase("sync").total == engine["engine KV cache"]


def test_recompute_and_frozen_parts_shrink_the_train_phase():
    base = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, [*FIT_7B, "actor.recompute_activations=false"]).phase("train").components
    recompute = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B).phase("train").components
    assert recompute["activations (decoder)"] < base["activations (decoder)"] / 10
    assert recompute["actor params"] == base["actor params"]
    frozen = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B + ["actor.freeze_vision_tower=true"])
    vision = count_parameters(read_model_dims(QWEN2_5_VL_7B_INSTRUCT)).vision_tower
    assert recompute["actor grads (fp32)"] - frozen.phase("train").components["actor grads (fp32)"] == vision * 4


def test_selective_recompute_comes_from_the_config():
    """actor.recompute_granularity=selective with the default modules (core_attn, mlp): each decoder layer keeps
    6h + 2*kv_heads*head_dim elements a token (the log-sum-exp and the MLP's 3f are recomputed); the vision
    tower's blocks rerun whole, as under full recompute."""
    full = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B)
    selective = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B + ["actor.recompute_granularity=selective"])
    train = selective.phase("train").components
    # TP2, one stage, 28 layers, 32768-token micro-batches, bf16: 28 * 32768 * 2 B * (6*3584 + 2*4*128) / 2
    assert train["activations (decoder)"] == 28 * 32768 * 2 * (6 * 3584 + 2 * 4 * 128) // 2 == 20669530112
    assert train["activations (vision tower)"] == full.phase("train").components["activations (vision tower)"]
    # vision (first stage): 12 images of ceil(2e6 / 28^2) = 2552 tokens, 4 patches each, shared out over the 2 TP
    # ranks: 4 * 12 * 2552 / 2 = 61248 patches a rank; each of the 32 blocks keeps its input (hv 1280) and one
    # block its full set (8*1280 + 3*3420 = 20500 elements a patch), in bf16
    assert train["activations (vision tower)"] == 61248 * 2 * (32 * 1280 + 20500) == 7528604160
    assert "note: activation recompute: selective (core_attn, mlp)" in format_launch_plan(selective)
    assert "note: activation recompute: full" in format_launch_plan(full)
    # selective needs about 76.1 GiB here, full 62.4: over a 72 GiB GPU only selective is refused
    assert full.phase("train").total < 72 * GiB < selective.phase("train").total
    message = rejection(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, ["actor.recompute_activations=true",
                                                             "actor.recompute_granularity=selective",
                                                             "cluster.gpu_memory_gb=72"])
    assert "phase 'train' needs about 76.1 GiB" in message and "actor.recompute_granularity=full" in message


def test_pipeline_stages_split_the_model():
    plan = plan_for(CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, FIT_32B + PP2_32B)
    train = plan.phase("train")
    # stage 0's extra: the vision tower's replicated params, grads and Adam state and its activations (/ tp), against
    # the last stage's logits
    assert train.where == "actor GPU, pipeline stage 0"
    counts = count_parameters(read_model_dims(QWEN2_5_VL_32B_INSTRUCT))
    expected = (32 * counts.per_layer + counts.embedding) / 8 + counts.vision
    assert train.components["actor params"] == pytest.approx(2 * expected, rel=1e-6)


def test_separate_placement_packs_engines_on_their_own_gpus():
    overrides = FIT_7B + ["trainer.rollout_placement=separate", "trainer.num_rollout_workers=3",
                          "rollout.tensor_parallel_size=2", "cluster.num_nodes=2"]
    plan = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, overrides)
    check_launch_plan(plan)
    assert (plan.gpus_needed, plan.nodes_needed) == (14, 2)
    assert [(e.node, e.local_gpus) for e in plan.engines] == [(1, (0, 1)), (1, (2, 3)), (1, (4, 5))]
    assert plan.phase("engine GPU").components["engine weights"] == plan.params.total
    assert "engine weights" not in plan.phase("train").components
    message = rejection(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, overrides[:-1])
    assert "the run needs 14 GPUs" in message
    assert "trainer.num_rollout_workers 3 x rollout.tensor_parallel_size 2 engine GPUs" in message


def test_dry_run_reads_a_checkpoint_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN2_5_VL_7B_INSTRUCT))
    cfg = load_config(CONFIG_7B, FIT_7B)
    report = dry_run(cfg, tmp_path)
    assert report == dry_run(cfg, tmp_path / "config.json")
    assert "parameters: 8.29B" in report and "verdict: fits" in report
    with pytest.raises(ValueError, match="no HF config.json"):
        dry_run(cfg, tmp_path / "missing")


def test_reference_model_counts_in_train_and_stays_when_not_offloaded():
    base = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B)
    ref = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B + ["algorithm.kl_coef=0.001"])
    params = base.phase("train").components["actor params"]
    assert ref.phase("train").total - base.phase("train").total == params
    assert ref.phase("rollout").total == base.phase("rollout").total  # offloaded to host outside its pass
    resident = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT,
                        FIT_7B + ["algorithm.kl_coef=0.001", "ref.offload_to_host=false"])
    assert resident.phase("rollout").total - base.phase("rollout").total == params


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from megatron_minio3.data.synthetic import VisualSearchSpec, write_visual_search_dataset

    return write_visual_search_dataset(tmp_path_factory.mktemp("data"), 2, seed=0,
                                       spec=VisualSearchSpec(width=112, height=112, num_distractors=1))


@pytest.mark.parametrize(
    "config, hf_config, cluster, fits",
    [
        (CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, [], True),  # the recipe's node of 8 GPUs
        (CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, ["cluster.gpus_per_node=4"], False),
        (CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, [], True),  # 2 nodes of 8
        (CONFIG_32B, QWEN2_5_VL_32B_INSTRUCT, ["cluster.num_nodes=1"], False),
    ],
)
def test_trainer_dry_run_of_the_shipped_configs(tmp_path, tiny_data, monkeypatch, capsys, config, hf_config, cluster,
                                                fits):
    """`python -m megatron_minio3.trainer.grpo --config ... --dry-run`: every pre-launch check against the model's
    config.json alone (no weights, no GPU, no worker), the plan printed, exit 0; too few GPUs exit 2 with the
    reason, before anything starts."""
    from megatron_minio3.trainer import grpo

    monkeypatch.setattr(grpo, "GRPOTrainer", lambda *args: pytest.fail("a dry run started the trainer"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(hf_config))
    monkeypatch.setenv("OPENAI_API_KEY", "unused-by-a-dry-run")  # the configs score with the LLM judge
    code = grpo.main(["--config", str(config), "--dry-run", f"model={model}", f"data.train_files=[{tiny_data}]",
                 f"data.val_files=[{tiny_data}]",
                 f"trainer.output_dir={tmp_path / 'run'}", *cluster])
    out, err = capsys.readouterr()
    assert not (tmp_path / "run").exists()
    if fits:
        assert code == 0, out + err
        assert "verdict: fits" in out and "dry run: every pre-launch check passed" in out
        gpus = 8 if config == CONFIG_7B else 16
        assert f"GPUs: {gpus} needed on {gpus // 8} node(s), {gpus} available" in out
    else:
        assert code == 2, out + err
        needed = 8 if config == CONFIG_7B else 16
        assert "verdict: REJECTED" in out and f"the run needs {needed} GPUs" in err


def test_explicit_kv_cache_and_several_engines_per_rank_are_planned():
    base = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B).phase("rollout").components
    explicit = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B + ["rollout.kv_cache_memory_mb=2048"])
    assert explicit.phase("rollout").components["engine KV cache"] == 2 * GiB
    assert explicit.kv_cache_tokens_per_engine == 2 * GiB // explicit.kv_bytes_per_token_per_gpu
    two = plan_for(CONFIG_7B, QWEN2_5_VL_7B_INSTRUCT, FIT_7B + ["rollout.num_engines=2"]).phase("rollout").components
    for part in ("engine weights", "engine KV cache", "engine activations (reserve)"):
        assert two[part] == 2 * base[part]
