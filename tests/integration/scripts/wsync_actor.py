"""torchrun worker: the Megatron actor (any TP/PP, CPU/gloo, fp32) streams its weights into a vLLM engine that
runs in another process (wsync_engine.py, rank 1 of a gloo weight group hosted by global rank 0).

Usage: torchrun --nproc_per_node N wsync_actor.py --hf-dir DIR --out-dir OUT --tp T --pp P --port PORT
           --steps S --bucket-bytes B

1. Right after loading, the export is checked against the HF checkpoint, tensor by tensor (rank 0).
2. S optimizer steps (packed GRPO update on the multimodal items of actor_step.py).
3. One weight sync to the engine process, which then runs the parity probe (OUT/probe.pt).
4. The actor scores the probe sequences (OUT/actor_logprobs.pt) and exports an HF checkpoint (OUT/hf_export).
Every rank writes OUT/rank{r}.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import AutoImageProcessor

from megatron_minio3.config.algorithm import AlgorithmConfig, PackingConfig
from megatron_minio3.config.schema import ActorConfig, OptimConfig
from megatron_minio3.convert.qwen2_5_vl import detect_naming
from megatron_minio3.convert.safetensors_io import SafetensorsReader
from megatron_minio3.packing import pack_mini_batch, pack_sequences, padding_multiple
from megatron_minio3.parallel import destroy_parallel, init_parallel
from megatron_minio3.weights.export import WeightExporter, save_hf_checkpoint
from megatron_minio3.weights.probe import ParityProbe
from megatron_minio3.weights.sync import BroadcastTarget, WeightGroup, sync_weights
from megatron_minio3.workers.actor.actor import MegatronActor
from tests.integration.scripts.actor_step import SMALL_BUDGET, make_items
from tests.integration.scripts.wsync_common import wait_for_file


def check_export_against_checkpoint(exporter: WeightExporter, hf_dir: str, is_writer: bool) -> dict:
    """Every rank iterates the buckets; the writer compares them with the checkpoint's tensors."""
    original = load_file(os.path.join(hf_dir, "model.safetensors")) if is_writer else {}
    seen, mismatched, bucket_bytes = [], [], []
    for bucket in exporter.buckets():
        bucket_bytes.append(bucket.num_bytes)
        for name, tensor in bucket.named_tensors():
            seen.append(name)
            if is_writer and not torch.equal(tensor, original.get(name, torch.empty(0))):
                mismatched.append(name)
    return {
        "names_match": sorted(seen) == sorted(original) if is_writer else None,
        "num_tensors": len(seen),
        "mismatched": mismatched,
        "bucket_bytes": bucket_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--bucket-bytes", type=int, required=True)
    args = parser.parse_args()
    out = Path(args.out_dir)

    ctx = init_parallel(tp=args.tp, pp=args.pp, seed=5)
    actor_cfg = ActorConfig(dtype="float32", optim=OptimConfig(lr=1e-3, clip_grad=1.0))
    actor = MegatronActor.from_hf(args.hf_dir, actor_cfg, AlgorithmConfig(), total_optimizer_steps=args.steps)
    with SafetensorsReader(args.hf_dir) as reader:
        naming = detect_naming(reader.names(), where=args.hf_dir)
    exporter = WeightExporter(actor.module, naming, bucket_bytes=args.bucket_bytes, dtype=torch.float32)
    result: dict = {"rank": ctx.rank, "tp_rank": ctx.tp_rank, "pp_rank": ctx.pp_rank}
    result["export_before_training"] = check_export_against_checkpoint(exporter, args.hf_dir, ctx.rank == 0)

    items = make_items(args.hf_dir)
    packed = pack_mini_batch(items, PackingConfig(max_tokens_per_microbatch=SMALL_BUDGET), dp_size=ctx.dp_size,
                             tp_size=ctx.tp_size)
    shard = packed.micro_batches[ctx.dp_rank]
    for _ in range(args.steps):
        scores = actor.compute_logprobs(shard)
        if scores is not None:  # on-policy: old log-probs from the current weights (last stage computes the loss)
            for mb, score in zip(shard, scores):
                mb.token_values_T["old_logprobs"] = score.logprobs_T
        update = actor.update(shard, packed.loss_counts)
        result.setdefault("grad_norms", []).append(update.grad_norm)

    targets = []
    if ctx.rank == 0:  # the sender of the weight group; the engine process is its rank 1
        targets = [BroadcastTarget(WeightGroup("127.0.0.1", args.port, rank=0, world_size=2, timeout_s=600))]
    stats = sync_weights(exporter, targets)
    result["sync"] = {"num_buckets": stats.num_buckets, "num_tensors": stats.num_tensors, "num_bytes": stats.num_bytes,
                      "seconds": stats.seconds}

    # score the engine's post-sync probe sequences with the actor
    payload = [None]
    if ctx.rank == 0:
        sequences = torch.load(wait_for_file(out / "probe.pt", 600), weights_only=False)["after"]
        cfg = actor.module.model_cfg
        payload[0] = ParityProbe.packing_items(
            sequences, AutoImageProcessor.from_pretrained(args.hf_dir), image_token_id=cfg.image_token_id,
            spatial_merge_size=cfg.vision.spatial_merge_size,
        )
    dist.broadcast_object_list(payload, src=0)
    micro_batch = pack_sequences(payload[0], list(range(len(payload[0]))), padding_multiple(ctx.tp_size))
    scores = actor.compute_logprobs([micro_batch])
    if ctx.is_last_stage and ctx.tp_rank == 0:
        torch.save(micro_batch.unpack(scores[0].logprobs_T), out / "actor_logprobs.pt")

    save_hf_checkpoint(exporter, out / "hf_export", args.hf_dir)
    with open(out / f"rank{ctx.rank}.json", "w") as f:
        json.dump(result, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
