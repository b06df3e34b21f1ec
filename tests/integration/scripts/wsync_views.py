"""The export's two forms at TP=--tp: flat buckets (what travels to other processes) and view buckets
(what an engine in this process loads), for the checkpoint's dtype and for a cast to bfloat16.

Usage: torchrun --nproc_per_node TP wsync_views.py --hf-dir DIR --out-dir OUT --bucket-bytes B --tp TP

Rank 0 writes OUT/result.json: for each dtype, whether both forms give the same names and values (and, in the
checkpoint's dtype, the checkpoint's tensors), which view tensors alias the parameters, and the buffers used.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_minio3.convert.qwen2_5_vl import detect_naming
from megatron_minio3.models.qwen2_5_vl.model import ModelOptions
from megatron_minio3.parallel import destroy_parallel, init_parallel
from megatron_minio3.weights.export import WeightExporter
from megatron_minio3.workers.actor.actor import build_model_from_hf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--bucket-bytes", type=int, required=True)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()

    ctx = init_parallel(tp=args.tp, pp=1)
    model = build_model_from_hf(args.hf_dir, ModelOptions(use_te=False))
    checkpoint = load_file(str(Path(args.hf_dir, "model.safetensors")))
    naming = detect_naming(checkpoint, where=args.hf_dir)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        exporter = WeightExporter(model, naming, bucket_bytes=args.bucket_bytes, dtype=dtype)
        flat, flat_buffers = [], set()
        for bucket in exporter.buckets():
            flat_buffers.add(bucket.flat.untyped_storage().data_ptr())
            flat += [(name, tensor.clone()) for name, tensor in bucket.named_tensors()]
        views, aliasing, view_flat_numel, contiguous = [], [], 0, True
        for bucket in exporter.buckets(views=True):
            view_flat_numel += bucket.flat.numel()
            for name, tensor in bucket.named_tensors():
                contiguous &= tensor.is_contiguous()
                if tensor.untyped_storage().data_ptr() in param_storages:
                    aliasing.append(name)
                views.append((name, tensor.clone()))
        result[str(dtype).removeprefix("torch.")] = {
            "num_buckets": len(exporter.plan()),
            "num_tensors": len(flat),
            "same_names": [n for n, _ in flat] == [n for n, _ in views],
            "mismatched": [n for (n, a), (_, b) in zip(flat, views) if a.dtype != dtype or not torch.equal(a, b)],
            "differs_from_checkpoint": [n for n, t in flat if not torch.equal(t, checkpoint[n].to(dtype))],
            "flat_buffers": len(flat_buffers),  # one buffer reused by every bucket
            "aliasing": aliasing,
            "view_flat_numel": view_flat_numel,  # elements gathered over TP (none at TP=1: no bucket buffer)
            "contiguous": contiguous,
        }
    if ctx.rank == 0:
        Path(args.out_dir, "result.json").write_text(json.dumps(result, indent=1))
    destroy_parallel()


if __name__ == "__main__":
    main()
