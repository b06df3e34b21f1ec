"""Megatron distributed checkpoint -> HF safetensors, in one process, one bucket of tensors at a time.

Full tensors are read straight from the checkpoint (whatever TP/PP wrote it), renamed/split by the rules
and streamed into size-capped safetensors shards, so memory stays near one bucket. The non-weight files
(config, tokenizer, processor, chat template) are copied from a HF directory of the same architecture.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor

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


def _load_request(rule: ParamRule, stored: dict[str, ShardedTensor], num_layers: int) -> ShardedTensor:
    """Request for one full (TP=1 layout) tensor; one row of the stacked tensor for a decoder layer."""
    key, layer = checkpoint_key(rule.megatron_name)
    buffer = torch.empty(rule.megatron_shape, dtype=stored[key].dtype)
    if layer is None:
        return ShardedTensor.from_rank_offsets(key, buffer)
    return ShardedTensor.from_rank_offsets(key, buffer, (0, layer, num_layers), prepend_axis_num=1)


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
    """Needs torch.distributed initialised (a world of one is enough).

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
        for bucket in _buckets(rules, stored, bucket_bytes):
            request = {r.megatron_name: _load_request(r, stored, cfg.text.num_layers) for r in bucket}
            loaded = dist_checkpointing.load(request, megatron_dir)
            for rule in bucket:
                for hf_name, tensor in megatron_to_hf(rule.megatron_name, loaded.pop(rule.megatron_name), cfg,
                                                      NAMINGS[naming_name]):
                    writer.write(hf_name, tensor.to(target_dtype(hf_name, tensor.dtype)))
        writer.close()
        copy_non_weight_files(hf_config_dir, tmp_dir)
    return metadata
