"""torchrun worker: vocab-parallel log-probs/entropy at TP=world size against a full-vocabulary reference.

Usage: torchrun --nproc_per_node 2 vp_logprobs.py --out-dir DIR   (each rank writes DIR/rank{r}.json)
Every rank builds the same full logits, keeps its vocabulary slice, and compares values and gradients with
log_softmax over the full vocabulary (float64). Every collective the function issues is recorded, to show that
no rank receives more than O(T) numbers. Every rank writes its max differences and collective sizes as JSON.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from megatron_minio3.parallel import destroy_parallel, init_parallel
from megatron_minio3.parallel.vocab_parallel import vocab_parallel_logprobs_and_entropy

NUM_TOKENS, PADDED_VOCAB = 37, 64

CASES = [
    # name, dtype, temperature, real vocabulary size (None: no padding)
    ("fp32_t1", torch.float32, 1.0, None),
    ("fp32_t0.7_padded", torch.float32, 0.7, 57),
    ("fp64_t1.3", torch.float64, 1.3, None),
    ("fp32_rank1_all_padding", torch.float32, 1.0, 30),
    ("bf16_t1", torch.bfloat16, 1.0, None),
]


def record_collectives(log: list) -> None:
    """Wrap the collectives that could move logits, logging (name, numel) of every call."""
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter"):
        original = getattr(dist, name)

        def wrapper(tensor, *args, _original=original, _name=name, **kwargs):
            log.append((_name, tensor.numel() if torch.is_tensor(tensor) else -1))
            return _original(tensor, *args, **kwargs)

        setattr(dist, name, wrapper)


def run_case(dtype, temperature, vocab_size, tp_rank, tp_size):
    generator = torch.Generator().manual_seed(7)
    full_logits_TV = (3 * torch.randn(NUM_TOKENS, PADDED_VOCAB, generator=generator, dtype=torch.float64)).to(dtype)
    real_vocab = vocab_size or PADDED_VOCAB
    targets_T = torch.randint(0, real_vocab, (NUM_TOKENS,), generator=generator)
    weight_logprob_T = torch.randn(NUM_TOKENS, generator=generator, dtype=torch.float64)
    weight_entropy_T = torch.randn(NUM_TOKENS, generator=generator, dtype=torch.float64)

    reference_logits = full_logits_TV.detach().clone().requires_grad_(True)
    log_probs_TV = torch.log_softmax(reference_logits[:, :real_vocab].double() / temperature, dim=-1)
    reference_logprobs_T = log_probs_TV.gather(-1, targets_T[:, None]).squeeze(-1)
    reference_entropy_T = -(log_probs_TV.exp() * log_probs_TV).sum(-1)
    ((reference_logprobs_T * weight_logprob_T + reference_entropy_T * weight_entropy_T).sum()).backward()

    num_local = PADDED_VOCAB // tp_size
    local_logits = full_logits_TV[:, tp_rank * num_local : (tp_rank + 1) * num_local].clone().requires_grad_(True)
    logprobs_T, entropy_T = vocab_parallel_logprobs_and_entropy(
        local_logits, targets_T, temperature, vocab_size=vocab_size
    )
    ((logprobs_T.double() * weight_logprob_T + entropy_T.double() * weight_entropy_T).sum()).backward()
    reference_grad = reference_logits.grad[:, tp_rank * num_local : (tp_rank + 1) * num_local]
    return {
        "logprob_diff": (logprobs_T.double() - reference_logprobs_T).abs().max().item(),
        "entropy_diff": (entropy_T.double() - reference_entropy_T).abs().max().item(),
        "grad_diff": (local_logits.grad.double() - reference_grad.double()).abs().max().item(),
        "grad_scale": reference_grad.abs().max().item(),
        "output_dtype": str(logprobs_T.dtype),
        "grad_dtype": str(local_logits.grad.dtype),
    }


def megatron_cross_entropy_diff(tp_rank, tp_size):
    """At temperature 1 the log-prob is minus megatron's own vocab-parallel cross-entropy."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    generator = torch.Generator().manual_seed(11)
    full_logits_TV = torch.randn(NUM_TOKENS, PADDED_VOCAB, generator=generator)
    targets_T = torch.randint(0, PADDED_VOCAB, (NUM_TOKENS,), generator=generator)
    num_local = PADDED_VOCAB // tp_size
    local_logits = full_logits_TV[:, tp_rank * num_local : (tp_rank + 1) * num_local]
    logprobs_T, _ = vocab_parallel_logprobs_and_entropy(local_logits.clone(), targets_T)
    megatron_loss = vocab_parallel_cross_entropy(local_logits.clone()[:, None, :], targets_T[:, None])[:, 0]
    return (logprobs_T + megatron_loss).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    context = init_parallel(tp=int(os.environ["WORLD_SIZE"]))
    collectives: list = []
    record_collectives(collectives)
    result = {"tp_size": context.tp_size, "tp_rank": context.tp_rank, "cases": {}}
    for name, dtype, temperature, vocab_size in CASES:
        start = len(collectives)
        result["cases"][name] = run_case(dtype, temperature, vocab_size, context.tp_rank, context.tp_size)
        result["cases"][name]["collectives"] = collectives[start:]
    result["megatron_cross_entropy_diff"] = megatron_cross_entropy_diff(context.tp_rank, context.tp_size)
    with open(os.path.join(args.out_dir, f"rank{context.rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
