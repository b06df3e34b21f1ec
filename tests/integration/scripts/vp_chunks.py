"""torchrun worker: vocab-chunked log-probs/entropy at TP = world size, against the unchunked call and float64
log_softmax over the full vocabulary.

Usage: torchrun --nproc_per_node 2 vp_chunks.py --out-dir DIR   (each rank writes DIR/rank{r}.json)
Plain gloo process group (the TP group is the world, passed as tp_group). Every rank builds the same full logits
and keeps its slice of V_local = 32 columns; per case and chunk size it records the max differences of log-probs,
entropies and gradients (of sum w1 * logprob + w2 * entropy) from the unchunked call (chunk_size = V_local) and
from the reference, and the sizes of the collectives each call issued.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from megatron_minio3.parallel.vocab_parallel import vocab_parallel_logprobs_and_entropy
from tests.integration.scripts.vp_logprobs import record_collectives

NUM_TOKENS, PADDED_VOCAB = 37, 64
CHUNK_SIZES = [1, 5, 13, 32, 40]  # 5 and 13 do not divide 32 (nor rank 1's 25 real columns at vocab 57)

CASES = [
    # name, dtype, temperature, real vocabulary size (None: no padding)
    ("fp32_t1", torch.float32, 1.0, None),
    ("fp32_t0.7_padded", torch.float32, 0.7, 57),
    ("fp32_t1.3_rank1_all_padding", torch.float32, 1.3, 30),
    ("bf16_t0.7_padded", torch.bfloat16, 0.7, 57),
]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def run_case(dtype, temperature, vocab_size, tp_rank, tp_size, collectives):
    generator = torch.Generator().manual_seed(5)
    full_logits_TV = (3 * torch.randn(NUM_TOKENS, PADDED_VOCAB, generator=generator, dtype=torch.float64)).to(dtype)
    real_vocab = vocab_size or PADDED_VOCAB
    targets_T = torch.randint(0, real_vocab, (NUM_TOKENS,), generator=generator)
    weights_2T = torch.randn(2, NUM_TOKENS, generator=generator, dtype=torch.float64)

    reference_logits = full_logits_TV.detach().double().requires_grad_(True)
    log_probs_TV = torch.log_softmax(reference_logits[:, :real_vocab] / temperature, dim=-1)
    reference_logprobs_T = log_probs_TV.gather(-1, targets_T[:, None]).squeeze(-1)
    reference_entropy_T = -(log_probs_TV.exp() * log_probs_TV).sum(-1)
    (weights_2T[0] @ reference_logprobs_T + weights_2T[1] @ reference_entropy_T).backward()
    num_local = PADDED_VOCAB // tp_size
    reference_grad = reference_logits.grad[:, tp_rank * num_local : (tp_rank + 1) * num_local]
    local_valid = max(0, min(num_local, real_vocab - tp_rank * num_local))  # this rank's real columns

    def call(chunk_size):
        local_logits = full_logits_TV[:, tp_rank * num_local : (tp_rank + 1) * num_local].clone().requires_grad_(True)
        start = len(collectives)
        logprobs_T, entropy_T = vocab_parallel_logprobs_and_entropy(
            local_logits, targets_T, temperature, vocab_size=vocab_size, tp_group=dist.group.WORLD,
            chunk_size=chunk_size,
        )
        issued = collectives[start:]
        (weights_2T[0] @ logprobs_T.double() + weights_2T[1] @ entropy_T.double()).backward()
        return logprobs_T.detach(), entropy_T.detach(), local_logits.grad, issued

    whole = call(num_local)
    out = {"grad_scale": reference_grad.abs().max().item(), "grad_dtype": str(whole[2].dtype), "chunks": {}}
    for chunk_size in CHUNK_SIZES:
        logprobs_T, entropy_T, grad_TV, issued = call(chunk_size)
        out["chunks"][str(chunk_size)] = {
            "logprob_vs_unchunked": max_diff(logprobs_T, whole[0]),
            "entropy_vs_unchunked": max_diff(entropy_T, whole[1]),
            "grad_vs_unchunked": max_diff(grad_TV, whole[2]),
            "logprob_vs_reference": max_diff(logprobs_T, reference_logprobs_T),
            "entropy_vs_reference": max_diff(entropy_T, reference_entropy_T),
            "grad_vs_reference": max_diff(grad_TV, reference_grad),
            "max_abs_logprob": logprobs_T.abs().max().item(),
            "max_abs_entropy": entropy_T.abs().max().item(),
            "num_padding_columns": num_local - local_valid,
            "padding_grad_abs_sum": grad_TV[:, local_valid:].abs().sum().item(),
            "collectives": issued,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    collectives: list = []
    record_collectives(collectives)
    result = {"tp_size": world, "tp_rank": rank, "cases": {}}
    for name, dtype, temperature, vocab_size in CASES:
        result["cases"][name] = run_case(dtype, temperature, vocab_size, rank, world, collectives)
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
