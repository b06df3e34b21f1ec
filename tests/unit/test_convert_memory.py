"""Conversion at bounded memory: the positioned-read safetensors reader (no memory mapping), the order in which a
rank's checkpoint files are appended to, lazily computed parameters, and the streaming HF -> Megatron writer,
whose files must be byte-identical to megatron's own writer's (slow test; this file is also its torchrun worker).
"""
from __future__ import annotations

import argparse
import json
import pickle
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from megatron_minio3.convert.safetensors_io import (
    INDEX_NAME,
    SafetensorsReader,
    StreamingSafetensorsWriter,
    TensorSpec,
    read_safetensors_header,
)
from megatron_minio3.convert.lazy_parameters import LazyParameters, interleaved_write_order

# ------------------------------------------------------------------------------------------------ reader


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "f32_3d": torch.randn(4, 6, 5, generator=generator),
        "bf16_2d": torch.randn(7, 3, generator=generator).bfloat16(),
        "f16_1d": torch.randn(9, generator=generator).half(),
        "i64_scalar": torch.tensor(42),
        "bool_2d": torch.randn(3, 4, generator=generator) > 0,
        "u8_empty": torch.zeros(0, 3, dtype=torch.uint8),
    }


def test_reader_reads_every_dtype_and_any_slice(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with SafetensorsReader(tmp_path) as reader:
        assert sorted(reader.names()) == sorted(tensors)
        for name, tensor in tensors.items():
            read = reader.read(name)
            assert read.dtype == tensor.dtype and read.shape == tensor.shape and torch.equal(read, tensor), name
            assert reader.shape(name) == tuple(tensor.shape) and reader.dtype(name) == tensor.dtype
            for dim, length in enumerate(tensor.shape):
                for start, stop in ((0, length), (length // 3, length - 1), (length - 1, length)):
                    if 0 <= start <= stop:
                        chunk = reader.read_chunk(name, dim, start, stop)
                        assert torch.equal(chunk, tensor.narrow(dim, start, stop - start)), (name, dim, start, stop)


def test_reader_keeps_no_mapping_of_the_checkpoint(tmp_path):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    tensors = sample_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with SafetensorsReader(tmp_path) as reader:
        values = [reader.read(name) for name in reader.names()]
        values.append(reader.read_chunk("f32_3d", 1, 2, 4))
        assert str(tmp_path / "model.safetensors") not in maps.read_text()
    assert len(values) == len(tensors) + 1


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    header_bytes = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def test_reader_errors_name_the_file_and_the_tensor(tmp_path):
    good = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}
    _write_raw(tmp_path / "model.safetensors", good, bytes(24))
    with SafetensorsReader(tmp_path) as reader:
        with pytest.raises(ValueError, match=r"tensor 'w' of shape \[2, 3\]: cannot read \[1, 4\) of dim 1"):
            reader.read_chunk("w", 1, 1, 4)
        with pytest.raises(ValueError, match="no tensor 'v'"):
            reader.read("v")
    bad_offsets = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    _write_raw(tmp_path / "a.safetensors", bad_offsets, bytes(24))
    with pytest.raises(ValueError, match=r"a.safetensors: tensor 'w' \(F32 \[2, 3\], 24 bytes\) has data_offsets"):
        read_safetensors_header(tmp_path / "a.safetensors")
    _write_raw(tmp_path / "b.safetensors", good, bytes(10))  # truncated data
    with pytest.raises(ValueError, match="b.safetensors: tensor 'w'"):
        read_safetensors_header(tmp_path / "b.safetensors")
    _write_raw(tmp_path / "c.safetensors", {"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, bytes(2))
    with pytest.raises(ValueError, match="c.safetensors: tensor 'w' has an unsupported dtype"):
        read_safetensors_header(tmp_path / "c.safetensors")
    (tmp_path / "d.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="d.safetensors: header length 1000 exceeds the file size"):
        read_safetensors_header(tmp_path / "d.safetensors")
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"w": "model.safetensors", "x": "model.safetensors"}}))
    with pytest.raises(ValueError, match="model.safetensors: has no tensor 'x'"):
        SafetensorsReader(tmp_path)


# ------------------------------------------------------------------------------------------ write order


def simulate(order: list[tuple[int, int]], files) -> tuple[int, int]:
    """(largest number of owners open at once, number of times an owner was opened) for a write order."""
    remaining = Counter(owner for items in files for owner, _ in items if owner is not None)
    open_owners: set = set()
    peak = opened = 0
    for f, i in order:
        owner = files[f][i][0]
        if owner is None:
            continue
        if owner not in open_owners:
            opened += 1
            open_owners.add(owner)
        remaining[owner] -= 1
        peak = max(peak, len(open_owners))
        if remaining[owner] == 0:
            open_owners.discard(owner)
    return peak, opened


def test_write_order_keeps_each_files_order_and_writes_everything():
    files = [
        [("a", 5), (None, 3), ("b", 2), ("c", 9)],
        [("b", 2), ("a", 5), (None, 1)],
        [],
        [(None, 4), ("c", 9), ("d", 1)],
    ]
    order = interleaved_write_order(files)
    assert sorted(order) == [(f, i) for f in range(len(files)) for i in range(len(files[f]))]
    for f in range(len(files)):
        assert [i for g, i in order if g == f] == list(range(len(files[f])))


def test_write_order_finishes_an_owner_split_over_two_files():
    # megatron's layout of fused fc1 weights: the gate half of layer k in one file, its up half in the other
    num_layers = 6
    files = [[(k, 100) for k in range(num_layers)], [(k, 100) for k in range(num_layers)]]
    order = interleaved_write_order(files)
    assert simulate(order, files) == (1, num_layers)
    sequential = [(f, i) for f in range(2) for i in range(num_layers)]
    assert simulate(sequential, files) == (num_layers, num_layers)  # what writing file after file would hold


def test_write_order_keeps_files_in_step_by_bytes():
    files = [[(None, 10)] * 3, [(None, 10)] * 3]
    assert interleaved_write_order(files) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    files = [[(None, 30), (None, 1)], [(None, 10), (None, 10), (None, 10)]]
    assert interleaved_write_order(files) == [(0, 0), (1, 0), (1, 1), (1, 2), (0, 1)]


# -------------------------------------------------------------------------------------- lazy parameters


def test_lazy_parameter_views_get_the_computed_values_and_are_dropped_after_the_last():
    param = torch.empty(4, 6)  # never filled
    value = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    calls = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return value.clone()

    lazy = LazyParameters(cache_bytes=10**6)
    lazy.add(param, compute, "w")
    top, bottom, stacked = param[:2], param[2:], param.view(1, 4, 6)
    assert lazy.is_lazy(bottom) and not lazy.is_lazy(torch.empty(3))
    lazy.expect([top, bottom, stacked])
    assert torch.equal(lazy.value_of(bottom), value[2:])
    lazy.release(bottom)
    assert torch.equal(lazy.value_of(stacked), value.view(1, 4, 6))
    lazy.release(stacked)
    assert torch.equal(lazy.value_of(top), value[:2])
    assert lazy.cached_bytes() == 96
    lazy.release(top)
    assert lazy.cached_bytes() == 0 and len(calls) == 1 and lazy.num_recomputed == 0


def test_lazy_cache_bound_evicts_and_recomputes():
    a, b = torch.empty(24), torch.empty(24)  # 96 bytes each
    lazy = LazyParameters(cache_bytes=100)
    lazy.add(a, lambda: torch.full((24,), 1.0), "a")
    lazy.add(b, lambda: torch.full((24,), 2.0), "b")
    views = [a[:12], b[:12], a[12:], b[12:]]
    lazy.expect(views)
    for view, expected in zip(views, (1.0, 2.0, 1.0, 2.0)):
        assert torch.equal(lazy.value_of(view), torch.full((12,), expected))
        assert lazy.cached_bytes() <= 100
        lazy.release(view)
    assert lazy.num_computed == 4 and lazy.num_recomputed == 2
    assert lazy.peak_cached_bytes == 192  # the new value and the one it evicts, for a moment


def test_lazy_parameter_errors_name_the_parameter():
    param = torch.empty(2, 3)
    lazy = LazyParameters()
    lazy.add(param, lambda: torch.zeros(3, 2), "layer.weight")
    with pytest.raises(ValueError, match="shares its storage with 'layer.weight'"):
        lazy.add(param[1:], lambda: torch.zeros(3), "other")
    with pytest.raises(ValueError, match=r"'layer.weight': computed \(3, 2\) torch.float32, parameter is \(2, 3\)"):
        lazy.value_of(param)
    with pytest.raises(ValueError, match="'t' must be contiguous"):
        lazy.add(torch.empty(3, 4).t(), lambda: torch.zeros(4, 3), "t")
    with pytest.raises(ValueError, match="cache_bytes must be >= 0"):
        LazyParameters(cache_bytes=-1)


# --------------------------------------------------------------------- streaming writer vs megatron's own


def hf_config(tied: bool) -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3 if tied else 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": tied,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu", "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16", "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
        "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 96, "num_heads": 2,
                          "out_hidden_size": 128, "fullatt_block_indexes": [1], "window_size": 112,
                          "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3,
                          "hidden_act": "silu"},
    }


def write_hf_checkpoint(hf_dir: Path, config: dict, seed: int) -> None:
    """Random tensors for every name the conversion rules expect (norms in float32, the rest bfloat16), in
    several files with an index."""
    from megatron_minio3.convert.qwen2_5_vl import RELEASED, checkpoint_rules
    from megatron_minio3.models.qwen2_5_vl.config import parse_hf_config

    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(config))
    specs = [
        TensorSpec(name, shape, torch.float32 if "norm" in name or "ln_q" in name else torch.bfloat16)
        for rule in checkpoint_rules(parse_hf_config(config), RELEASED)
        for name, shape in zip(rule.hf_names, rule.hf_shapes())
    ]
    writer = StreamingSafetensorsWriter(hf_dir, specs, max_shard_bytes=200_000)
    generator = torch.Generator().manual_seed(seed)
    for spec in specs:
        writer.write(spec.name, torch.randn(spec.shape, generator=generator).to(spec.dtype))
    writer.close()


@pytest.mark.slow
def test_streaming_checkpoint_is_byte_identical_to_megatrons(tmp_path):
    from tests.distributed import run_torchrun

    cases = {"untied": ("2x1", False), "tied": ("1x2", True)}  # TP2; PP2 with the tied output layer
    for label, (layout, tied) in cases.items():
        write_hf_checkpoint(tmp_path / label / "hf", hf_config(tied), seed=len(label))
    case_args = [f"--case={label}@{layout}" for label, (layout, _) in cases.items()]
    run_torchrun(Path(__file__), 2, ["--work", tmp_path, *case_args], timeout=600)
    for label in cases:
        reference = tmp_path / label / "megatron_writer"
        files = sorted(p.name for p in reference.iterdir())
        assert sum(name.endswith(".distcp") for name in files) == 4  # 2 ranks x 2 files
        for streamed in ("streaming", "streaming_cache0", "converted"):
            out = tmp_path / label / streamed
            assert sorted(p.name for p in out.iterdir()) == files
            for name in files:
                if name != ".metadata":  # pickled with the checkpoint's own path
                    assert (out / name).read_bytes() == (reference / name).read_bytes(), (label, streamed, name)
            want, got = (pickle.loads((d / ".metadata").read_bytes()) for d in (reference, out))
            assert got.state_dict_metadata == want.state_dict_metadata
            assert got.storage_data == want.storage_data
            assert got.planner_data == want.planner_data and got.all_local_plans == want.all_local_plans
        for rank in (0, 1):
            stats = json.loads((tmp_path / label / f"stats_rank{rank}.json").read_text())
            # every parameter this rank writes is read once; replicas other ranks write are never read
            assert stats["num_recomputed"] == 0 and 0 < stats["num_computed"] <= stats["num_params"]
            assert stats["peak_cached_bytes"] <= 2 * stats["largest_param_bytes"]
            assert stats["cache0_peak_cached_bytes"] <= 2 * stats["largest_param_bytes"]


def worker(work: Path, cases: list[str]) -> None:
    """torchrun worker: per case, the checkpoint written by megatron's writer from a filled model, by the streaming
    writer (default cache and no cache) and by convert_hf_to_megatron; stats of the streaming runs per rank."""
    from megatron.core import parallel_state as mpu

    from megatron_minio3.convert.hf_to_megatron import (
        checkpoint_dtype,
        convert_hf_to_megatron,
        lazy_hf_weights,
        load_hf_weights_into_model,
    )
    from megatron_minio3.convert.megatron_checkpoint import CheckpointMetadata, save_megatron_checkpoint
    from megatron_minio3.convert.qwen2_5_vl import detect_naming
    from megatron_minio3.models.qwen2_5_vl.config import load_hf_config
    from megatron_minio3.models.qwen2_5_vl.model import ModelOptions, build_model
    from megatron_minio3.parallel import destroy_parallel, init_parallel

    for case in cases:
        label, layout = case.split("@")
        tp, pp = (int(x) for x in layout.split("x"))
        init_parallel(tp, pp, backend="gloo")
        hf_dir, out = work / label / "hf", work / label
        cfg = load_hf_config(hf_dir)
        with SafetensorsReader(hf_dir) as reader:
            naming = detect_naming(reader.names())
            options = ModelOptions(params_dtype=checkpoint_dtype(reader), use_te=False, use_cpu_initialization=True,
                                   perform_initialization=False)
            metadata = CheckpointMetadata(cfg, naming.name, {n: str(reader.dtype(n)).removeprefix("torch.")
                                                             for n in reader.names()})
            filled = build_model(cfg, options)
            load_hf_weights_into_model(filled, reader, naming)
            save_megatron_checkpoint(filled, out / "megatron_writer", metadata)
            del filled
            model = build_model(cfg, options)
            lazy = lazy_hf_weights(model, reader, naming)
            save_megatron_checkpoint(model, out / "streaming", metadata, lazy=lazy)
            cache0 = lazy_hf_weights(model, reader, naming, cache_bytes=0)
            save_megatron_checkpoint(model, out / "streaming_cache0", metadata, lazy=cache0)
        convert_hf_to_megatron(hf_dir, out / "converted")
        stats = {
            "num_params": len(lazy), "num_computed": lazy.num_computed, "num_recomputed": lazy.num_recomputed,
            "peak_cached_bytes": lazy.peak_cached_bytes, "cache0_peak_cached_bytes": cache0.peak_cached_bytes,
            "largest_param_bytes": max(p.numel() * p.element_size() for p in model.parameters()),
        }
        (out / f"stats_rank{torch.distributed.get_rank()}.json").write_text(json.dumps(stats))
        assert mpu.model_parallel_is_initialized()
    destroy_parallel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--case", action="append", required=True, help="label@TPxPP")
    args = parser.parse_args()
    worker(args.work, args.case)
