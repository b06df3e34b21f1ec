"""The pure parts of tools/bench/actor_step.py: the bench shapes against the released 7B config, the packed layout
(lengths, text/image segments), the packed micro-batch's model FLOPs against numbers written out here, the
MFU arithmetic and the planner-based layer fit (no torch model is built)."""
import importlib.util
import sys
from pathlib import Path

import pytest

from megatron_minio3.trainer.launch_plan import GiB, count_parameters, read_model_dims
from megatron_minio3.trainer.planner import model_flops_per_token

from tests.unit.test_launch_plan import QWEN2_5_VL_7B_INSTRUCT
from tests.unit.test_planner import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_actor_step", REPO_ROOT / "tools" / "bench" / "actor_step.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # its dataclasses look their module up
_spec.loader.exec_module(bench)


def test_7b_shape_has_the_released_dimensions():
    assert read_model_dims(bench.shape_hf_config("7b")) == read_model_dims(QWEN2_5_VL_7B_INSTRUCT)
    assert count_parameters(read_model_dims(bench.shape_hf_config("7b"))).total == 8_292_166_656
    dims = read_model_dims(bench.shape_hf_config("7b", layers=12, vision_depth=8))
    assert (dims.num_layers, dims.hidden_size, dims.intermediate_size, dims.vocab_size) == (12, 3584, 18944, 152064)
    assert (dims.vision_depth, dims.vision_num_full_attention_blocks) == (8, 1)  # block 7 of 7/15/23/31
    assert bench.shape_hf_config("7b", vision_depth=4)["vision_config"]["fullatt_block_indexes"] == [3]


def test_demo_shape_is_the_tiny_checkpoint():
    config = bench.shape_hf_config("demo")
    assert (config["hidden_size"], config["num_hidden_layers"], config["vision_config"]["depth"]) == (256, 2, 2)
    assert config["vocab_size"] % 128 == 0 and config["image_token_id"] < config["vocab_size"]
    with pytest.raises(ValueError, match="--layers"):
        bench.shape_hf_config("demo", layers=0)


def test_sequence_lengths_fill_the_micro_batch_in_padding_multiples():
    lengths = bench.sequence_lengths(8192, 8, multiple=4)
    assert sum(lengths) == 8192 and all(n % 4 == 0 for n in lengths)
    assert len(set(lengths)) == 8 and max(lengths) < 2 * min(lengths)
    assert bench.sequence_lengths(1024, 4) == [186, 232, 279, 327]  # 1024 * (4, 5, 6, 7) / 22, rest to the last
    with pytest.raises(ValueError, match="multiple"):
        bench.sequence_lengths(1000, 4, multiple=16)
    with pytest.raises(ValueError, match="cannot hold"):
        bench.sequence_lengths(8, 4, multiple=4)


def test_text_segments_leave_room_for_the_images():
    segments = bench.text_segments(1000, 2, 256)  # 2 x (256 + vision start/end) = 516 image-block tokens
    assert segments == [161, 161, 162] and sum(segments) + 2 * 258 == 1000
    assert bench.text_segments(10, 0, 0) == [10]
    with pytest.raises(ValueError, match="--image-size"):
        bench.text_segments(520, 2, 256)
    assert bench.image_grid(448) == (1, 32, 32) and bench.tokens_per_image((1, 32, 32)) == 256
    with pytest.raises(ValueError, match="multiple of 28"):
        bench.image_grid(450)
    assert bench.batch_image_fraction(8192, 8, 2, 448) == 0.5  # 8 trajectories x 2 images x 256 tokens


def test_packed_flops_count_attention_per_sequence_and_the_vision_tower():
    d = read_model_dims(TINY)  # hidden 64, 2 layers; vision as in tests/unit/test_planner.py
    L = 100
    one = bench.micro_batch_model_flops(d, [bench.SequenceShape(L, 0, 0)])
    assert one == L * model_flops_per_token(d, L)
    two = bench.micro_batch_model_flops(d, [bench.SequenceShape(L, 0, 0)] * 2)
    joined = bench.micro_batch_model_flops(d, [bench.SequenceShape(2 * L, 0, 0)])
    # one sequence of 2L attends over twice the context: 12 * layers * hidden * ((2L)^2 - 2 L^2) / 2 more
    assert joined - two == pytest.approx(12 * 2 * 64 * (4 * L * L - 2 * L * L) / 2)
    # 4 image tokens of one 4 x 4-patch image: per token merge^2 * (6 * tower 58816 + 12 * hv 32 * context
    # (one window block over min(64, 16) patches + one full block over 16)) + 6 * merger 24800 = 1609536
    with_image = bench.micro_batch_model_flops(d, [bench.SequenceShape(L, 4, 16)])
    assert with_image - one == pytest.approx(4 * 1_609_536)


def test_throughput_and_mfu():
    figures = bench.throughput(2.0, 16384, 3.956e14, 1, 989.0)
    assert figures["tokens_per_s"] == 8192 and figures["model_tflops_per_gpu"] == pytest.approx(197.8)
    assert figures["mfu"] == pytest.approx(0.2)
    assert bench.throughput(1.0, 100, 4e12, 2, None)["model_tflops_per_gpu"] == pytest.approx(2.0)
    assert bench.throughput(1.0, 100, 4e12, 2, None)["mfu"] is None
    with pytest.raises(ValueError, match="step time"):
        bench.throughput(0.0, 1, 1.0, 1, None)


def test_fit_layers_is_the_largest_depth_under_the_planner_budget():
    def estimate(layers):
        return bench.planner_train_estimate(bench.shape_hf_config("7b", layers), seq_len=4096, recompute="none",
                                            image_fraction=0.5)["total_bytes"]

    budget = estimate(5) + 1
    assert bench.fit_layers("7b", budget, seq_len=4096, recompute="none", image_fraction=0.5) == (5, estimate(5))
    assert bench.fit_layers("7b", 1 * GiB, seq_len=4096, recompute="none", image_fraction=0.5)[0] == 0
    full = bench.fit_layers("7b", budget, seq_len=4096, recompute="full", image_fraction=0.5)[0]
    assert full > 5  # recompute keeps fewer activations: more layers fit
