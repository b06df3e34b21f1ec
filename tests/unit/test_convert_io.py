"""Streaming safetensors I/O and atomic output directories."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_minio3.convert.safetensors_io import (
    INDEX_NAME,
    SafetensorsReader,
    StreamingSafetensorsWriter,
    TensorSpec,
    atomic_directory,
)
from tests.distributed import REPO_ROOT


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(10, 6, generator=generator),
        "model.norm.weight": torch.randn(6, generator=generator).bfloat16(),
        "visual.patch_embed.proj.weight": torch.randn(4, 3, 2, 2, 2, generator=generator).half(),
        "steps": torch.arange(7),
    }


def write_all(out_dir, tensors, max_shard_bytes):
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = StreamingSafetensorsWriter(out_dir, specs, max_shard_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    return writer.close()


def test_sharded_output_with_index_is_standard_safetensors(tmp_path):
    tensors = sample_tensors()
    files = write_all(tmp_path, tensors, max_shard_bytes=250)
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    loaded = {}
    for file_name in files:
        loaded.update(load_file(str(tmp_path / file_name)))  # safetensors' own loader validates the headers
        assert all(index["weight_map"][n] == file_name for n in load_file(str(tmp_path / file_name)))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[n], t) and loaded[n].dtype == t.dtype for n, t in tensors.items())


def test_single_file_when_everything_fits(tmp_path):
    assert write_all(tmp_path, sample_tensors(), max_shard_bytes=10**6) == ["model.safetensors"]
    assert not (tmp_path / INDEX_NAME).exists()


def test_writer_rejects_out_of_plan_writes(tmp_path):
    tensors = sample_tensors()
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = StreamingSafetensorsWriter(tmp_path, specs, 10**6)
    with pytest.raises(ValueError, match="'model.norm.weight' written out of order: expected 'model.embed_tokens"):
        writer.write("model.norm.weight", tensors["model.norm.weight"])
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' is \(10, 5\) torch.float32, planned"):
        writer.write("model.embed_tokens.weight", torch.zeros(10, 5))
    writer.write("model.embed_tokens.weight", tensors["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="3 planned tensor.*never written, first: \\['model.norm.weight'"):
        writer.close()


def test_reader_reads_only_the_requested_slice(tmp_path):
    tensors = sample_tensors()
    write_all(tmp_path, tensors, max_shard_bytes=250)
    with SafetensorsReader(tmp_path) as reader:
        assert reader.shapes()["visual.patch_embed.proj.weight"] == (4, 3, 2, 2, 2)
        assert reader.dtype("model.norm.weight") == torch.bfloat16
        embed = tensors["model.embed_tokens.weight"]
        assert torch.equal(reader.read_chunk("model.embed_tokens.weight", 0, 5, 10), embed[5:10])
        assert torch.equal(reader.read_chunk("model.embed_tokens.weight", 1, 2, 4), embed[:, 2:4])
        assert torch.equal(reader.read_chunk("steps", None, 0, 0), tensors["steps"])


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="neither model.safetensors.index.json nor model.safetensors"):
        SafetensorsReader(tmp_path)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                  "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors: listed in .* but missing"):
        SafetensorsReader(tmp_path)


def test_atomic_directory_appears_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "partial").write_text("x")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "done").write_text("x")
    assert (target / "done").read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ValueError, match="already exists"):
        with atomic_directory(target):
            pass


def test_size_flag_parsing():
    spec = importlib.util.spec_from_file_location("convert_m2h", REPO_ROOT / "tools" / "convert_megatron_to_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.parse_size("5GB") == 5 * 10**9
    assert tool.parse_size("512MiB") == 512 * 2**20
    assert tool.parse_size("1000") == 1000
    with pytest.raises(Exception, match="bad size"):
        tool.parse_size("5 parsecs")
