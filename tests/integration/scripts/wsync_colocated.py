"""One process holding both the Megatron policy (a world of one, CPU/gloo, fp32) and a vLLM engine: the
colocated in-process sync, with the peak extra memory it takes.

Usage: torchrun --nproc_per_node 1 wsync_colocated.py --hf-dir DIR --out-dir OUT --bucket-bytes B

The policy's weights are perturbed (a stand-in for an optimizer step), the engine runs the parity probe
(filling its caches), the weights are synced through InProcessTarget while the process's peak resident
memory is tracked (VmHWM, reset just before; run with a fixed MALLOC_MMAP_THRESHOLD_ so freed tensors
leave the resident set; the export alone is measured too), then the probe runs again and the policy scores
it. Writes OUT/result.json.
"""
from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path

import torch
from transformers import AutoImageProcessor

from megatron_minio3.convert.qwen2_5_vl import checkpoint_rules
from megatron_minio3.packing import pack_sequences
from megatron_minio3.parallel import destroy_parallel
from megatron_minio3.rollout.agent_loop import AgentLoop
from megatron_minio3.rollout.engine import VllmEngine
from megatron_minio3.weights.probe import ParityProbe
from megatron_minio3.weights.sync import InProcessTarget, sync_weights
from tests.integration.scripts.wsync_common import DATA_CFG, ENGINE_CFG, in_process_args, make_probe, perturb, policy_and_exporter


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_extra_bytes(run):
    """(run(), peak resident memory above the starting point while it ran)."""
    gc.collect()
    baseline_kib = memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    result = run()
    return result, (memory_kib("VmHWM") - baseline_kib) * 1024


def main() -> None:
    args = in_process_args()
    policy, naming, exporter = policy_and_exporter(args.hf_dir, args.bucket_bytes)
    perturb(policy.model)
    cfg = policy.model.model_cfg
    largest = max(4 * torch.Size(rule.megatron_shape).numel() for rule in checkpoint_rules(cfg, naming))

    engine = VllmEngine(ENGINE_CFG, args.hf_dir)
    loop = AgentLoop.from_config([engine], engine.tokenizer, engine.vision, ENGINE_CFG, DATA_CFG)
    probe = make_probe()
    before = asyncio.run(probe.rollout(engine, loop))
    exporter.plan()  # the one-off collective planning is not part of a sync's memory

    _, export_extra = peak_extra_bytes(lambda: sync_weights(exporter, []))  # the export alone
    stats, sync_extra = peak_extra_bytes(lambda: sync_weights(exporter, [InProcessTarget(engine)]))

    after = asyncio.run(probe.rollout(engine, loop))
    items = ParityProbe.packing_items(
        after, AutoImageProcessor.from_pretrained(args.hf_dir), image_token_id=cfg.image_token_id,
        spatial_merge_size=cfg.vision.spatial_merge_size,
    )
    micro_batch = pack_sequences(items, list(range(len(items))), 1)
    scores = policy.compute_logprobs([micro_batch])
    metrics = probe.report(after, micro_batch.unpack(scores[0].logprobs_T))
    result = {
        "export_extra_peak_bytes": export_extra,
        "sync_extra_peak_bytes": sync_extra,
        "bucket_bytes": args.bucket_bytes,
        "largest_bucket_bytes": max(sum(e.numel for e in plan.entries) * 4 for plan in exporter.plan()),
        "largest_tensor_bytes": largest,
        "model_bytes": stats.num_bytes,
        "num_buckets": stats.num_buckets,
        "sync_seconds": stats.seconds,
        "tokens_changed": [b.token_ids != a.token_ids for b, a in zip(before, after)],
        "metrics": metrics,
    }
    Path(args.out_dir, "result.json").write_text(json.dumps(result, indent=1))
    engine.shutdown()  # vLLM's shutdown also tears down torch.distributed's default group
    destroy_parallel()


if __name__ == "__main__":
    main()
