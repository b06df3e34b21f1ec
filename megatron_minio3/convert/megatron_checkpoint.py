"""Our Megatron distributed checkpoints (torch_dist): save/load a model, plus the metadata they carry.

A checkpoint holds ``model.sharded_state_dict()`` (so it loads at any TP/PP) and, in its common part, a
``minio3`` entry: the architecture (our typed config), the HF tensor-name layout it came from and the dtype
of every HF tensor, so that the HF export can reproduce the original checkpoint exactly.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling

from megatron_minio3.convert.lazy_parameters import LazyParameters
from megatron_minio3.convert.qwen2_5_vl import canonical_megatron_name
from megatron_minio3.convert.streaming_save import StreamingTorchDistSaveStrategy
from megatron_minio3.models.qwen2_5_vl.config import Qwen2_5_VLConfig

METADATA_KEY = "minio3"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointMetadata:
    model_config: Qwen2_5_VLConfig
    hf_naming: str  # a key of convert.qwen2_5_vl.NAMINGS
    hf_dtypes: dict[str, str]  # HF tensor name -> torch dtype name ("bfloat16", ...)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model_config": self.model_config.to_dict(),
            "hf_naming": self.hf_naming,
            "hf_dtypes": dict(self.hf_dtypes),
        }

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "CheckpointMetadata":
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{where}: checkpoint format_version {data.get('format_version')} != {FORMAT_VERSION}")
        return cls(
            model_config=Qwen2_5_VLConfig.from_dict(data["model_config"]),
            hf_naming=data["hf_naming"],
            hf_dtypes=dict(data["hf_dtypes"]),
        )


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


def config_differences(a: Qwen2_5_VLConfig, b: Qwen2_5_VLConfig) -> list[str]:
    """Human-readable 'field: a != b' lines (empty when the architectures agree)."""
    diffs = []
    for section in ("text", "vision"):
        sa, sb = getattr(a, section), getattr(b, section)
        diffs += [
            f"{section}.{f.name}: {getattr(sa, f.name)} != {getattr(sb, f.name)}"
            for f in fields(sa)
            if getattr(sa, f.name) != getattr(sb, f.name)
        ]
    diffs += [
        f"{f.name}: {getattr(a, f.name)} != {getattr(b, f.name)}"
        for f in fields(a)
        if f.name not in ("text", "vision") and getattr(a, f.name) != getattr(b, f.name)
    ]
    return diffs


_LAYER_RE = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)\.(.+)$")


def checkpoint_key(canonical_name: str) -> tuple[str, int | None]:
    """(key in the distributed checkpoint, layer number or None).

    megatron stores the decoder layers stacked: 'language_model.decoder.layers.7.mlp.linear_fc2.weight' is
    row 7 of the tensor 'language_model.decoder.layers.mlp.linear_fc2.weight' of shape [num_layers, ...].
    """
    match = _LAYER_RE.match(canonical_name)
    if match is None:
        return canonical_name, None
    return match.group(1) + match.group(3), int(match.group(2))


def global_named_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """(canonical name, parameter) for this rank's parameters: global layer numbers, TE norm spelling."""
    layers = model.language_model.decoder.layers
    layer_offset = layers[0].layer_number - 1 if len(layers) else 0
    for name, param in model.named_parameters():
        yield canonical_megatron_name(name, layer_offset), param


def read_checkpoint_metadata(checkpoint_dir: str | os.PathLike) -> CheckpointMetadata:
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "metadata.json").is_file():
        raise ValueError(f"{checkpoint_dir}: not a Megatron distributed checkpoint (no metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(checkpoint_dir))
    if METADATA_KEY not in common:
        raise ValueError(f"{checkpoint_dir}: checkpoint has no '{METADATA_KEY}' metadata (not written by our converter)")
    return CheckpointMetadata.from_dict(common[METADATA_KEY], where=str(checkpoint_dir))


def save_megatron_checkpoint(
    model: torch.nn.Module,
    out_dir: str | os.PathLike,
    metadata: CheckpointMetadata,
    overwrite: bool = False,
    lazy: LazyParameters | None = None,
) -> None:
    """Collective over all ranks: writes to a temporary sibling directory, renamed when every rank is done.

    lazy: parameters whose values are computed only when written (convert/streaming_save.py); the files are
    the ones megatron's own writer produces, written one parameter at a time.
    """
    out_dir = Path(out_dir)
    rank = dist.get_rank()
    tmp_holder: list[str | None] = [None]
    error: list[str | None] = [None]
    if rank == 0:
        if out_dir.exists() and not overwrite:
            error[0] = f"{out_dir} already exists (pass --overwrite to replace it)"
        else:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp_holder[0] = tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent)
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise ValueError(error[0])
    dist.broadcast_object_list(tmp_holder, src=0)
    tmp_dir = tmp_holder[0]
    try:
        state = model.sharded_state_dict()
        state[METADATA_KEY] = metadata.to_dict()
        strategy = None
        if lazy is not None:
            strategy = StreamingTorchDistSaveStrategy(
                lazy, progress_description=f"writing {out_dir}" if rank == 0 else None
            )
        dist_checkpointing.save(state, tmp_dir, sharded_strategy=strategy)
        dist.barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if rank == 0:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    dist.barrier()


def load_megatron_checkpoint(model: torch.nn.Module, checkpoint_dir: str | os.PathLike) -> CheckpointMetadata:
    """Loads this rank's shard of every parameter (any TP/PP); ValueError on an architecture mismatch or a
    tensor the checkpoint lacks."""
    metadata = read_checkpoint_metadata(checkpoint_dir)
    diffs = config_differences(metadata.model_config, model.model_cfg)
    if diffs:
        raise ValueError(f"{checkpoint_dir}: architecture differs from the model's: {'; '.join(diffs)}")
    sharded = model.sharded_state_dict()
    # megatron's names: "missing" = in the checkpoint but not requested (e.g. a training checkpoint's optimizer
    # state), "unexpected" = requested but not in the checkpoint.
    loaded, _not_requested, absent = dist_checkpointing.load(
        sharded, str(checkpoint_dir), strict=StrictHandling.RETURN_ALL
    )
    # Transformer Engine's per-module _extra_state (fp8 metadata) is absent from checkpoints written with
    # the local spec; TE initialises it itself.
    missing = sorted(key for key in absent if not key.endswith("_extra_state"))
    if missing:
        raise ValueError(f"{checkpoint_dir}: checkpoint lacks tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    # only the model's entries: a training checkpoint also holds optimizer and trainer state
    result = model.load_state_dict({key: loaded[key] for key in sharded if key in loaded}, strict=False)
    not_loaded = [k for k in result.missing_keys if not k.endswith("_extra_state")] + list(result.unexpected_keys)
    assert not not_loaded, f"state dict keys not matched after a complete load: {not_loaded[:8]}"
    return metadata
