"""HF safetensors -> Megatron distributed checkpoint, run by every rank of a TP x PP torchrun job.

Each rank builds only its own stage and tensor-parallel shard of the model (no random initialisation, and its
parameters are never filled: their memory is allocated but untouched) and writes the checkpoint parameter by
parameter, reading each from the exact HF rows/columns it needs (safetensors slices) just before it is written
(convert/streaming_save.py), so the memory of a process is about one parameter. The checkpoint written from
any TP/PP loads at any other TP/PP.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch
from megatron.core import parallel_state as mpu

from megatron_minio3.convert.lazy_parameters import DEFAULT_CACHE_BYTES, LazyParameters
from megatron_minio3.convert.megatron_checkpoint import (
    CheckpointMetadata,
    global_named_parameters,
    save_megatron_checkpoint,
)
from megatron_minio3.convert.qwen2_5_vl import (
    HfNaming,
    ParamRule,
    detect_naming,
    parameter_rule,
    validate_hf_tensors,
)
from megatron_minio3.convert.safetensors_io import SafetensorsReader
from megatron_minio3.convert.tp import chunk_bounds
from megatron_minio3.models.qwen2_5_vl.config import load_hf_config
from megatron_minio3.models.qwen2_5_vl.model import ModelOptions, build_model
from megatron_minio3.progress import Progress


def parameter_shard(rule: ParamRule, reader: SafetensorsReader, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of one Megatron parameter: ``rule.layout.from_parts(chunk tp_rank of each HF part)``,
    reading only those chunks (whole parts for replicated parameters)."""
    chunks = []
    for hf_name in rule.hf_names:
        if rule.tp_dim is None:
            chunks.append(reader.read(hf_name))
        else:
            start, stop = chunk_bounds(reader.shape(hf_name)[rule.tp_dim], tp_rank, tp_size, hf_name)
            chunks.append(reader.read_chunk(hf_name, rule.tp_dim, start, stop))
    return rule.layout.from_parts(chunks)


def load_hf_weights_into_model(model: torch.nn.Module, reader: SafetensorsReader, naming: HfNaming) -> None:
    """Copies this rank's shard of every parameter from the HF tensors (reading only the needed slices)."""
    cfg = model.model_cfg
    tp_rank = mpu.get_tensor_model_parallel_rank()
    tp_size = mpu.get_tensor_model_parallel_world_size()
    named = list(global_named_parameters(model))
    progress = Progress(sum(p.numel() * p.element_size() for _, p in named), "loading HF weights", unit="B",
                        scale=1e6, scale_unit="MB", enabled=torch.distributed.get_rank() == 0
                        if torch.distributed.is_initialized() else True)
    with torch.no_grad(), progress:
        for name, param in named:
            shard = parameter_shard(parameter_rule(name, cfg, naming), reader, tp_rank, tp_size)
            assert shard.shape == param.shape, f"{name}: shard {tuple(shard.shape)} vs parameter {tuple(param.shape)}"
            param.copy_(shard)
            progress.update(param.numel() * param.element_size())


def lazy_hf_weights(
    model: torch.nn.Module, reader: SafetensorsReader, naming: HfNaming, cache_bytes: int = DEFAULT_CACHE_BYTES
) -> LazyParameters:
    """Every parameter of this rank, to be computed from the HF tensors only when the checkpoint writer writes it
    (see convert/streaming_save.py); the model's parameters themselves are never filled."""
    cfg = model.model_cfg
    tp_rank = mpu.get_tensor_model_parallel_rank()
    tp_size = mpu.get_tensor_model_parallel_world_size()
    lazy = LazyParameters(cache_bytes)
    for name, param in global_named_parameters(model):
        rule = parameter_rule(name, cfg, naming)

        def compute(rule: ParamRule = rule, dtype: torch.dtype = param.dtype) -> torch.Tensor:
            return parameter_shard(rule, reader, tp_rank, tp_size).to(dtype)

        lazy.add(param, compute, name)
    return lazy


def checkpoint_dtype(reader: SafetensorsReader) -> torch.dtype:
    """The dtype most HF tensors have (norm weights are sometimes stored wider)."""
    counts = Counter(reader.dtype(name) for name in reader.names())
    return counts.most_common(1)[0][0]


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    params_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> CheckpointMetadata:
    """Collective: call on every rank after init_parallel(tp, pp) with world size tp * pp.

    The model is built without filling its parameters; each one is read from the HF slices it needs while the
    checkpoint is written and dropped after it (at most ``cache_bytes`` of computed values kept, at least one
    parameter), so a rank's memory is about one parameter, not its shard of the model.
    """
    hf_dir = Path(hf_dir)
    cfg = load_hf_config(hf_dir)
    with SafetensorsReader(hf_dir) as reader:
        naming = detect_naming(reader.names(), where=str(hf_dir))
        validate_hf_tensors(reader.shapes(), cfg, naming, where=str(hf_dir))
        options = ModelOptions(
            params_dtype=params_dtype or checkpoint_dtype(reader),
            use_te=False,  # the checkpoint keys do not depend on the layer spec
            use_cpu_initialization=True,
            perform_initialization=False,
        )
        model = build_model(cfg, options)
        metadata = CheckpointMetadata(
            model_config=cfg,
            hf_naming=naming.name,
            hf_dtypes={name: str(reader.dtype(name)).removeprefix("torch.") for name in reader.names()},
        )
        save_megatron_checkpoint(model, out_dir, metadata, overwrite=overwrite,
                                 lazy=lazy_hf_weights(model, reader, naming, cache_bytes))
    return metadata
