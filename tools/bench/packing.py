"""Share of real tokens in packed (THD) vs padded micro-batches on a Mini-o3-like length distribution.

Usage: python tools/bench/packing.py [--num-samples 512] [--budget 32768] [--tp 2] [--dp 8] [--seed 0]

Trajectory lengths follow the Mini-o3 recipe's shape: one original image resized under 2,000,000 pixels
(~1,200-2,550 vision tokens after the 2x2 merge), a ~150-token question, then 1-6 turns (long tail) of a
~80-400-token reply plus, for every turn but the last, an observation of ~60 text tokens and a crop of
51-2,550 vision tokens (log-uniform between the min_pixels and max_pixels limits); capped at 32,768 tokens.
The padded baselines are the usual non-packed layouts: micro-batches of `--micro-batch-size` sequences
padded to their longest member, and every sequence padded to the maximum length.
Prints one line per layout; nothing here runs a model (see docs/algorithms.md for the recorded figures).
"""
from __future__ import annotations

import argparse
import math
import random

import torch

from megatron_minio3.config.algorithm import PackingConfig
from megatron_minio3.packing import PackingItem, pack_mini_batch

MAX_TOTAL_LENGTH = 32768
TURN_PROBABILITIES = (0.22, 0.24, 0.18, 0.13, 0.11, 0.12)  # 1..6 turns, long multi-turn tail


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def minio3_like_length(rng: random.Random) -> int:
    length = 150 + rng.randint(1200, 2550)
    num_turns = rng.choices(range(1, 7), weights=TURN_PROBABILITIES)[0]
    for turn in range(num_turns):
        length += int(log_uniform(rng, 80, 400))
        if turn < num_turns - 1:
            length += 60 + int(log_uniform(rng, 51, 2550))
    return min(length, MAX_TOTAL_LENGTH)


def text_item(length: int) -> PackingItem:
    """Only the lengths matter here; the loss mask covers the second half."""
    return PackingItem(
        token_ids=torch.zeros(length, dtype=torch.long),
        loss_mask=(torch.arange(length) >= length // 2).long(),
        position_ids=torch.arange(length).expand(3, length),
    )


def padded_tokens(lengths: list[int], micro_batch_size: int, rng: random.Random) -> int:
    order = lengths[:]
    rng.shuffle(order)
    chunks = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    return sum(len(chunk) * max(chunk) for chunk in chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=512, help="trajectories in the mini-batch")
    parser.add_argument("--budget", type=int, default=32768, help="max_tokens_per_microbatch")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per padded micro-batch")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    lengths = [minio3_like_length(rng) for _ in range(args.num_samples)]
    real = sum(lengths)
    sorted_lengths = sorted(lengths)
    print(
        f"{len(lengths)} trajectories: mean {real / len(lengths):.0f} tokens, median "
        f"{sorted_lengths[len(lengths) // 2]}, p90 {sorted_lengths[int(0.9 * len(lengths))]}, max {max(lengths)}"
    )
    config = PackingConfig(max_tokens_per_microbatch=args.budget)
    packed = pack_mini_batch([text_item(n) for n in lengths], config, dp_size=args.dp, tp_size=args.tp)
    num_micro_batches = [len(rank) for rank in packed.micro_batches]
    rank_tokens = [sum(mb.num_tokens for mb in rank) for rank in packed.micro_batches]
    rank_workloads = [
        sum(
            config.workload_linear_coef * n + config.workload_quadratic_coef * n * n
            for mb in rank
            for n in (mb.cu_seqlens_padded[1:] - mb.cu_seqlens_padded[:-1]).tolist()
        )
        for rank in packed.micro_batches
    ]
    print(
        f"packed THD (budget {args.budget}, tp {args.tp}, dp {args.dp}): real-token share "
        f"{real / packed.num_tokens:.4f}; micro-batches per rank {min(num_micro_batches)}-{max(num_micro_batches)}; "
        f"workload max/mean over ranks {max(rank_workloads) / (sum(rank_workloads) / len(rank_workloads)):.3f}; "
        f"tokens max/mean over ranks {max(rank_tokens) / (sum(rank_tokens) / len(rank_tokens)):.3f}"
    )
    padded = padded_tokens(lengths, args.micro_batch_size, rng)
    print(f"padded to the longest of {args.micro_batch_size} per micro-batch: real-token share {real / padded:.3f}")
    print(f"padded to max length {MAX_TOTAL_LENGTH}: real-token share {real / (len(lengths) * MAX_TOTAL_LENGTH):.3f}")


if __name__ == "__main__":
    main()
