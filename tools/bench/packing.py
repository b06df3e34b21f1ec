"""Share of real tokens in packed (THD) vs padded micro-batches on a Mini-o3-like length distribution.

Usage: python tools/bench/packing.py [--num-samples 512] [--budget 32768] [--tp 2] [--dp 8] [--seed 0]
       python tools/bench/packing.py --step-time [--step-budgets 1536,4096] [--hf-dir DIR] [--scale 8]

Trajectory lengths follow the Mini-o3 recipe's shape: one original image resized under 2,000,000 pixels
(~1,200-2,550 vision tokens after the 2x2 merge), a ~150-token question, then 1-6 turns (long tail) of a
~80-400-token reply plus, for every turn but the last, an observation of ~60 text tokens and a crop of
51-2,550 vision tokens (log-uniform between the min_pixels and max_pixels limits); capped at 32,768 tokens.
The padded baselines are the usual non-packed layouts: micro-batches of `--micro-batch-size` sequences
padded to their longest member, and every sequence padded to the maximum length.
Prints one line per layout.

--step-time also times one forward+backward pass of a tiny Qwen2.5-VL (generated, or --hf-dir) on CPU over
`--step-samples` trajectories with lengths divided by `--scale`: packed THD micro-batches under each of
`--step-budgets` (block-causal mask, the CPU attention path) against [micro-batch-size, longest] padded
batches, and prints the time ratios.
On CPU the packed mask path still computes dense [T, T] attention scores, so this ratio understates what
Transformer Engine's THD kernels (cost sum L_i^2) gain on GPU. Figures are recorded in docs/algorithms.md.
"""
from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from megatron_minio3.config.algorithm import PackingConfig
from megatron_minio3.packing import PackingItem, pack_mini_batch, sequence_workload

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


def padded_chunks_of(lengths: list[int], micro_batch_size: int, rng: random.Random) -> list[list[int]]:
    order = lengths[:]
    rng.shuffle(order)
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


def step_time_ratio(args, lengths: list[int]) -> None:
    from megatron_minio3.models.qwen2_5_vl.model import ModelOptions
    from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import make_tiny_checkpoint
    from megatron_minio3.parallel import destroy_parallel, init_parallel
    from megatron_minio3.parallel.vocab_parallel import vocab_parallel_logprobs_and_entropy
    from megatron_minio3.workers.actor.actor import build_model_from_hf

    torch.set_num_threads(args.threads)
    init_parallel()
    hf_dir = args.hf_dir or make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", size="tiny", seed=0)
    model = build_model_from_hf(hf_dir, ModelOptions(params_dtype=torch.float32, use_te=False))
    model.train()
    vocab_size = model.model_cfg.text.vocab_size
    rng = random.Random(args.seed + 1)
    step_lengths = [max(8, n // args.scale) for n in rng.sample(lengths, args.step_samples)]
    items = []
    for n in step_lengths:
        token_ids = torch.tensor([rng.randrange(400) for _ in range(n)])
        items.append(
            PackingItem(token_ids=token_ids, loss_mask=(torch.arange(n) >= n // 2).long(),
                        position_ids=torch.arange(n).expand(3, n))
        )
    step_budgets = [int(b) for b in args.step_budgets.split(",")] if args.step_budgets else [args.budget // args.scale]
    packed_layouts = {
        budget: pack_mini_batch(items, PackingConfig(max_tokens_per_microbatch=budget), dp_size=1).micro_batches[0]
        for budget in step_budgets
    }

    def packed_passes(micro_batches):
        for mb in micro_batches:
            logits = model(mb.input_ids_T[None], mb.position_ids_3T[:, None], attention_mask=mb.attention_mask())
            logprobs, _ = vocab_parallel_logprobs_and_entropy(logits[0], mb.labels_T, vocab_size=vocab_size)
            (logprobs * mb.loss_mask_T).sum().backward()

    order = list(range(len(items)))
    rng.shuffle(order)
    chunks = [order[i : i + args.micro_batch_size] for i in range(0, len(order), args.micro_batch_size)]

    def padded_passes():
        for chunk in chunks:
            longest = max(items[i].length for i in chunk)
            ids = torch.zeros(len(chunk), longest, dtype=torch.long)
            labels = torch.zeros(len(chunk), longest, dtype=torch.long)
            mask = torch.zeros(len(chunk), longest)
            for row, i in enumerate(chunk):
                n = items[i].length
                ids[row, :n] = items[i].token_ids
                labels[row, : n - 1] = items[i].token_ids[1:]
                mask[row, : n - 1] = items[i].loss_mask[1:].float()
            positions = torch.arange(longest).expand(3, len(chunk), longest)
            logits = model(ids, positions)  # causal; padding sits after the real tokens
            logprobs, _ = vocab_parallel_logprobs_and_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), vocab_size=vocab_size
            )
            (logprobs * mask.reshape(-1)).sum().backward()

    real = sum(step_lengths)
    padded_total = sum(len(c) * max(items[i].length for i in c) for c in chunks)
    # Interleaved repeats, best of each: the machine is shared, so drift hits every layout alike.
    runs = {f"packed{budget}": (lambda mbs=mbs: packed_passes(mbs)) for budget, mbs in packed_layouts.items()}
    runs["padded"] = padded_passes
    # Wall time and process CPU time (less sensitive to other jobs on the machine); best of each.
    best = {name: float("inf") for name in runs}
    best_cpu = {name: float("inf") for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
            best_cpu[name] = min(best_cpu[name], time.process_time() - start_cpu)
    print(
        f"CPU forward+backward, tiny Qwen2.5-VL, {len(items)} trajectories (lengths / {args.scale}, "
        f"{real} real tokens, {args.threads} threads, best of {args.repeats} interleaved): padded to the longest "
        f"of {args.micro_batch_size}: {padded_total} tokens in {len(chunks)} micro-batches {best['padded']:.2f} s "
        f"(CPU {best_cpu['padded']:.2f} s)"
    )
    for budget, micro_batches in packed_layouts.items():
        name = f"packed{budget}"
        print(
            f"  packed, budget {budget}: {sum(mb.num_tokens for mb in micro_batches)} tokens in "
            f"{len(micro_batches)} micro-batches {best[name]:.2f} s (CPU {best_cpu[name]:.2f} s); padded/packed "
            f"ratio wall {best['padded'] / best[name]:.2f}, CPU time {best_cpu['padded'] / best_cpu[name]:.2f}"
        )
    destroy_parallel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=512, help="trajectories in the mini-batch")
    parser.add_argument("--budget", type=int, default=32768, help="max_tokens_per_microbatch")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="sequences per padded micro-batch")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-time", action="store_true", help="also time forward+backward on CPU")
    parser.add_argument("--hf-dir", default="", help="checkpoint for --step-time (default: a generated tiny one)")
    parser.add_argument("--scale", type=int, default=8, help="--step-time divides lengths and budget by this")
    parser.add_argument("--step-samples", type=int, default=32, help="trajectories timed by --step-time")
    parser.add_argument("--step-budgets", default="", help="--step-time budgets, comma-separated (default budget/scale)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
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

    def workload(n: int) -> float:
        return sequence_workload(n, config.workload_linear_coef, config.workload_quadratic_coef)

    rank_workloads = [
        sum(
            workload(n)
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
    padded_chunks = padded_chunks_of(lengths, args.micro_batch_size, rng)
    padded = sum(len(chunk) * max(chunk) for chunk in padded_chunks)
    packed_work = sum(rank_workloads)
    padded_work = sum(len(chunk) * workload(max(chunk)) for chunk in padded_chunks)
    print(
        f"padded to the longest of {args.micro_batch_size} per micro-batch: real-token share {real / padded:.3f}; "
        f"modelled compute (a*L + b*L^2, THD attention kernels) padded/packed {padded_work / packed_work:.2f}"
    )
    print(f"padded to max length {MAX_TOTAL_LENGTH}: real-token share {real / (len(lengths) * MAX_TOTAL_LENGTH):.3f}")
    if args.step_time:
        step_time_ratio(args, lengths)


if __name__ == "__main__":
    main()
