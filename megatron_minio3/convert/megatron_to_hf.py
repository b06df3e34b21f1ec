"""Megatron distributed checkpoint -> HF safetensors, in one process, one bucket of tensors at a time.

Full tensors are read straight from the checkpoint (whatever TP/PP wrote it), renamed/split by the rules
and streamed into size-capped safetensors shards, so memory stays near one bucket. The non-weight files
(config, tokenizer, processor, chat template) are copied from a HF directory of the same architecture.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_minio3.convert.megatron_checkpoint import (
    CheckpointMetadata,
    checkpoint_key,
    config_differences,
    dtype_from_name,
    read_checkpoint_metadata,
)
from megatron_minio3.convert.qwen2_5_vl import NAMINGS, ParamRule, checkpoint_rules, megatron_to_hf
from megatron_minio3.convert.safetensors_io import (
    INDEX_NAME,
    StreamingSafetensorsWriter,
    TensorSpec,
    atomic_directory,
)
from megatron_minio3.models.qwen2_5_vl.config import load_hf_config
from megatron_minio3.progress import Progress

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _check_checkpoint_tensors(
    checkpoint_dir: str, rules: list[ParamRule], num_layers: int
) -> dict[str, ShardedTensor]:
    """Metadata of the stored tensors, after checking they are exactly the ones the rules expect."""
    stored = {
        key: value
        for key, value in dist_checkpointing.load_tensors_metadata(checkpoint_dir).items()
        if not key.endswith("_extra_state")
    }
    expected: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        key, layer = checkpoint_key(rule.megatron_name)
        expected[key] = rule.megatron_shape if layer is None else (num_layers, *rule.megatron_shape)
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(stored[k].global_shape)} (expected {expected[k]})"
        for k in set(expected) & set(stored)
        if tuple(stored[k].global_shape) != expected[k]
    )
    problems = [f"{label}: {items[:8]}" for label, items in
                (("missing tensors", missing), ("unexpected tensors", extra), ("mis-shaped tensors", wrong)) if items]
    if problems:
        raise ValueError(f"{checkpoint_dir} does not match its recorded architecture: " + "; ".join(problems))
    return stored


class _BoxReadPlanner(DefaultLoadPlanner):
    """torch.distributed.checkpoint planner that fills plain buffers from boxes of stored tensors (one decoder
    layer of a stacked tensor, or a whole tensor), reading only the saved chunks that overlap each box.

    megatron's own loader cannot read part of a stored tensor in a single process, so the exporter reads
    through torch's checkpoint planner directly.
    """

    def __init__(self, boxes: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.boxes = boxes  # buffer name -> (stored key, offsets of the box in the stored tensor)

    def create_local_plan(self) -> LoadPlan:
        items = []
        for name, (key, offsets) in self.boxes.items():
            box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=self.state_dict[name].shape)
            for item in create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [box]):
                items.append(dataclasses.replace(item, dest_index=MetadataIndex(name)))
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


def read_full_tensors(checkpoint_dir: str, rules: list[ParamRule], stored: dict[str, ShardedTensor]) -> dict:
    """Full (TP=1 layout) tensors of the given rules, whatever TP/PP wrote the checkpoint."""
    buffers, boxes = {}, {}
    for rule in rules:
        key, layer = checkpoint_key(rule.megatron_name)
        dtype = stored[key].dtype
        if layer is None:
            buffers[rule.megatron_name] = torch.empty(rule.megatron_shape, dtype=dtype)
            boxes[rule.megatron_name] = (key, (0,) * len(rule.megatron_shape))
        else:
            buffers[rule.megatron_name] = torch.empty((1, *rule.megatron_shape), dtype=dtype)
            boxes[rule.megatron_name] = (key, (layer,) + (0,) * len(rule.megatron_shape))
    dcp.load(buffers, storage_reader=dcp.FileSystemReader(checkpoint_dir), planner=_BoxReadPlanner(boxes),
             no_dist=True)
    return {name: buffers[name].reshape(rule.megatron_shape) for name, rule in zip(buffers, rules)}


def _buckets(rules: list[ParamRule], stored: dict[str, ShardedTensor], bucket_bytes: int) -> list[list[ParamRule]]:
    buckets: list[list[ParamRule]] = [[]]
    size = 0
    for rule in rules:
        element_size = torch.empty((), dtype=stored[checkpoint_key(rule.megatron_name)[0]].dtype).element_size()
        num_bytes = element_size * torch.Size(rule.megatron_shape).numel()
        if buckets[-1] and size + num_bytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(rule)
        size += num_bytes
    return buckets


def copy_non_weight_files(hf_config_dir: Path, out_dir: Path) -> None:
    for path in sorted(hf_config_dir.iterdir()):
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != INDEX_NAME:
            shutil.copy2(path, out_dir / path.name)


def convert_megatron_to_hf(
    megatron_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    hf_config_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    bucket_bytes: int = 1024**3,
    dtype: torch.dtype | None = None,
    naming: str | None = None,
    overwrite: bool = False,
) -> CheckpointMetadata:
    """One process, no torch.distributed needed.

    dtype: output dtype of every tensor (default: each tensor's dtype in the original HF checkpoint).
    naming: HF tensor-name layout, "released" or "transformers5" (default: the original checkpoint's).
    """
    megatron_dir, hf_config_dir = str(megatron_dir), Path(hf_config_dir)
    metadata = read_checkpoint_metadata(megatron_dir)
    cfg = metadata.model_config
    diffs = config_differences(cfg, load_hf_config(hf_config_dir))
    if diffs:
        raise ValueError(f"{hf_config_dir}/config.json describes another architecture than {megatron_dir}: {diffs}")
    naming_name = naming or metadata.hf_naming
    if naming_name not in NAMINGS:
        raise ValueError(f"unknown HF naming {naming_name!r}; choose one of {sorted(NAMINGS)}")
    rules = checkpoint_rules(cfg, NAMINGS[naming_name])
    stored = _check_checkpoint_tensors(megatron_dir, rules, cfg.text.num_layers)
    # HF dtypes were recorded under the original checkpoint's names.
    original_names = {
        new: old
        for new_rule, old_rule in zip(rules, checkpoint_rules(cfg, NAMINGS[metadata.hf_naming]))
        for new, old in zip(new_rule.hf_names, old_rule.hf_names)
    }

    def target_dtype(hf_name: str, stored_dtype: torch.dtype) -> torch.dtype:
        if dtype is not None:
            return dtype
        recorded = metadata.hf_dtypes.get(original_names[hf_name])
        return stored_dtype if recorded is None else dtype_from_name(recorded)

    specs = []
    for rule in rules:
        for hf_name, shape in zip(rule.hf_names, rule.hf_shapes()):
            stored_dtype = stored[checkpoint_key(rule.megatron_name)[0]].dtype
            specs.append(TensorSpec(hf_name, shape, target_dtype(hf_name, stored_dtype)))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp_dir:
        writer = StreamingSafetensorsWriter(tmp_dir, specs, max_shard_bytes)
        total = sum(spec.num_bytes for spec in specs)
        with Progress(total, f"writing HF checkpoint {out_dir}", unit="B", scale=1e6, scale_unit="MB") as progress:
            for bucket in _buckets(rules, stored, bucket_bytes):
                loaded = read_full_tensors(megatron_dir, bucket, stored)
                for rule in bucket:
                    for hf_name, tensor in megatron_to_hf(rule.megatron_name, loaded.pop(rule.megatron_name), cfg,
                                                          NAMINGS[naming_name]):
                        tensor = tensor.to(target_dtype(hf_name, tensor.dtype))
                        writer.write(hf_name, tensor)
                        progress.update(tensor.numel() * tensor.element_size())
        writer.close()
        copy_non_weight_files(hf_config_dir, tmp_dir)
    return metadata
