"""torchrun worker: activation recompute (actor.recompute_activations, full or selective) changes memory, not numbers.

Usage: torchrun --nproc_per_node N recompute_grads.py --hf-dir DIR --out-dir OUT --tp T

Three actors from the same checkpoint (no recompute, full, selective core_attn + mlp) take one optimizer step on the same packed
multimodal mini-batch (the vision tower trains too); every rank writes the grad norms, the loss and the
largest parameter difference after the step, and how often the first decoder layer, its core attention
and MLP, and the first vision block ran forward.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron_minio3.config.algorithm import AlgorithmConfig, PackingConfig
from megatron_minio3.config.schema import ActorConfig, OptimConfig
from megatron_minio3.packing import pack_mini_batch
from megatron_minio3.parallel import destroy_parallel, init_parallel
from megatron_minio3.workers.actor.actor import MegatronActor
from tests.integration.scripts.actor_step import make_items


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()

    ctx = init_parallel(tp=args.tp, pp=1, seed=5)
    items = make_items(args.hf_dir)
    packed = pack_mini_batch(items, PackingConfig(max_tokens_per_microbatch=1024), dp_size=ctx.dp_size,
                             tp_size=ctx.tp_size)
    results = {}
    params = {}
    modes = {"plain": {}, "full": {"recompute_activations": True},
             "selective": {"recompute_activations": True, "recompute_granularity": "selective"}}
    for mode, settings in modes.items():
        actor_cfg = ActorConfig(dtype="float32", optim=OptimConfig(lr=1e-3, clip_grad=0.0), **settings)
        actor = MegatronActor.from_hf(args.hf_dir, actor_cfg, AlgorithmConfig(), total_optimizer_steps=2)
        calls = {"decoder_layer": 0, "core_attention": 0, "mlp": 0, "vision_block": 0}  # recomputed: twice a step

        def counter(name):
            def hook(module, inputs):
                calls[name] += 1
            return hook

        layer = actor.module.language_model.decoder.layers[0]
        layer.register_forward_pre_hook(counter("decoder_layer"))
        layer.self_attention.core_attention.register_forward_pre_hook(counter("core_attention"))
        layer.mlp.register_forward_pre_hook(counter("mlp"))
        actor.module.vision_model.blocks[0].register_forward_pre_hook(counter("vision_block"))
        result = actor.update(packed.micro_batches[ctx.dp_rank], packed.loss_counts)
        results[mode] = {"grad_norm": result.grad_norm, "loss": result.metrics.get("loss"), "calls": calls}
        params[mode] = [p.detach().clone() for p in actor.module.parameters()]
    max_diff = {mode: max(float((a - b).abs().max()) for a, b in zip(params["plain"], params[mode]))
                for mode in ("full", "selective")}
    moved = max(float(p.abs().max()) for p in params["plain"])
    Path(args.out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(
        {**results, "param_max_abs_diff": max_diff, "param_max": moved,
         "num_micro_batches": len(packed.micro_batches[ctx.dp_rank])}))
    destroy_parallel()


if __name__ == "__main__":
    main()
