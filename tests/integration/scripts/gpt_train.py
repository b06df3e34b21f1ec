"""torchrun worker: train a small megatron-core GPTModel on a fixed batch through the real pipeline schedule.

Usage: torchrun --nproc_per_node 2 gpt_train.py --tp 2 --pp 1 --steps 6 --out losses.json
Rank 0 of the last pipeline stage writes the per-step losses (and the grad norms) as JSON.
"""
from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from megatron_minio3.parallel import destroy_parallel, init_parallel
from megatron_minio3.parallel.grad import clip_grad_norm_

VOCAB, SEQ, BATCH, MICRO = 128, 32, 4, 2


def build_model(pre_process: bool, post_process: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core import parallel_state as mpu

    config = TransformerConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=128,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=mpu.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=mpu.get_pipeline_model_parallel_world_size(),
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=False,
    )
    return model, config


def train(ctx, steps: int) -> tuple[list[float], list[float]]:
    """Runs `steps` optimizer steps on the fixed batch; returns (losses on the last stage, grad norms)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model, config = build_model(ctx.is_first_stage, ctx.is_last_stage)
    config.finalize_model_grads_func = None
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    gen = torch.Generator().manual_seed(0)  # the same fixed batch on every rank
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), diagonal=1)[None, None]

    def loss_func(output_tensor):
        loss = output_tensor.float().mean()
        # clone: the schedule divides the returned loss in place by the number of micro-batches
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        ids, lbl, pos = next(data_iterator)
        out = model(ids, pos, causal.expand(ids.shape[0], 1, SEQ, SEQ), labels=lbl)
        return out, partial(loss_func)

    losses, grad_norms = [], []
    forward_backward = get_forward_backward_func()
    for _ in range(steps):
        optimizer.zero_grad()
        micro_batches = [
            (input_ids[i : i + MICRO], labels[i : i + MICRO], position_ids[i : i + MICRO])
            for i in range(0, BATCH, MICRO)
        ]
        reduced = forward_backward(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=model,
            num_microbatches=len(micro_batches),
            seq_length=SEQ,
            micro_batch_size=MICRO,
            forward_only=False,
        )
        grad_norms.append(clip_grad_norm_(model.parameters(), max_norm=1.0))
        optimizer.step()
        if ctx.is_last_stage:
            losses.append(float(torch.stack([r["loss"] for r in reduced]).mean()))
    return losses, grad_norms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    ctx = init_parallel(tp=args.tp, pp=args.pp, seed=7)
    losses, grad_norms = train(ctx, args.steps)
    if ctx.is_last_stage and ctx.tp_rank == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "grad_norms": grad_norms, "world_size": ctx.world_size}, f)
    destroy_parallel()


if __name__ == "__main__":
    main()
