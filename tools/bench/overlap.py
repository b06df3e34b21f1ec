"""Over-provisioning (trainer.overlap_rounds): a step's dynamic-sampling rounds with and without overlap, measured in
one run.

Usage: python tools/bench/overlap.py [--steps 4] [--prompts-per-round 4] [--n 4] [--batch 6] [--overlap-at 0.5]

Two rollout handles (RolloutRuntime, the object the trainer uses, one vLLM CPU engine each, the generated tiny
checkpoint) collect the same steps with the driver's own round loop (step_plan.collect_rounds): one with
trainer.overlap_rounds off, one with it on, alternating step by step, each step on both with the same seeds. Rounds
of few prompts with long, uneven turns make a step of several rounds, each with a tail. Printed per arm: the
generation wall time of a step (the time the driver waits for its rounds), rounds, tokens, and the ratio; the kept
groups of both arms are checked to be the same, token for token.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="steps measured per arm (after one warm-up step)")
    parser.add_argument("--prompts-per-round", type=int, default=4)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--batch", type=int, default=6, help="groups with a learning signal a step needs")
    parser.add_argument("--overlap-at", type=float, default=0.5, help="trainer.overlap_rounds_at")
    parser.add_argument("--think-max", type=int, default=120, help="longest reasoning text of a turn (chars)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from megatron_minio3.config import load_config
    from megatron_minio3.data.minio3_json import read_minio3_json
    from megatron_minio3.data.synthetic import VisualSearchSpec, write_visual_search_dataset
    from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import make_tiny_checkpoint
    from megatron_minio3.trainer.sampler import PromptSampler
    from megatron_minio3.trainer.step_plan import collect_rounds
    from megatron_minio3.workers.placement import round_shares
    from megatron_minio3.workers.rollout_worker import RolloutRuntime

    work = Path(tempfile.mkdtemp(prefix="bench_overlap_"))
    model = make_tiny_checkpoint(work / "ckpt", size="tiny")
    spec = VisualSearchSpec(width=448, height=336, num_distractors=12, question_kinds=("mc",))
    data = write_visual_search_dataset(work / "data", 64, seed=0, spec=spec)
    prompts = read_minio3_json(data)
    regex = (rf"<think>[a-z ]{{4,{args.think_max}}}</think>("
             r'<grounding>\{"bbox_2d": \[0\.[0-4], 0\.[0-4], 0\.[5-9], 0\.[5-9]\], "source": "original_image"\}'
             r"</grounding>|<answer>\([A-D]\)</answer>)")

    def config(overlap: bool):
        settings = {
            "model": str(model), "data.train_files": f"[{data}]", "rollout.n": args.n, "rollout.max_turns": 3,
            "rollout.max_tokens_per_turn": 160, "rollout.max_total_tokens": 2048, "rollout.context_reserve_tokens": 128,
            "rollout.kv_cache_memory_mb": 128, "rollout.guided_regex": f"'{regex}'",
            "reward.verifiers": "{synthetic_visual_search: mc}", "algorithm.dynamic_sampling": "true",
            "trainer.output_dir": str(work / ("on" if overlap else "off")), "trainer.train_batch_size": args.batch,
            "trainer.prompts_per_round_multiplier": args.prompts_per_round / args.batch,
            "trainer.max_generation_rounds": 16, "trainer.overlap_rounds": str(overlap).lower(),
            "trainer.overlap_rounds_at": args.overlap_at,
        }
        return load_config(REPO / "configs/tiny_cpu.yaml", [f"{k}={v}" for k, v in settings.items()])

    arms = {name: (config(overlap), RolloutRuntime(config(overlap), [], handle=0))
            for name, overlap in (("off", False), ("on", True))}
    results: dict[str, list[dict]] = {name: [] for name in arms}
    try:
        for step in range(1, args.steps + 2):  # step 1 warms both engines up (grammar compilation, first shapes)
            kept_tokens = {}
            for name, (cfg, runtime) in arms.items():
                sampler = PromptSampler(prompts, cfg.trainer.seed + step)

                def generate_round(round_prompts, round_index, next_prompts, cfg=cfg, runtime=runtime, step=step):
                    (share,) = round_shares(cfg.rollout.seed, round_prompts, step, round_index, next_prompts, 1)
                    return [runtime.generate_round(*share)]

                started = time.perf_counter()
                collection = collect_rounds(generate_round, sampler, cfg.trainer.train_batch_size,
                                            cfg.trainer.max_generation_rounds, cfg.trainer.prompts_per_round,
                                            cfg.trainer.overlap_rounds, step)
                seconds = time.perf_counter() - started
                keys = [group.key(i) for group in collection.kept for i in range(len(group.samples))]
                runtime.end_generation()  # as the driver does: a round started early and not needed is dropped
                (sequences,) = runtime.take_training_shares([keys])
                kept_tokens[name] = [seq.token_ids for seq in sequences]
                generated = sum(s.trajectory.num_generated_tokens for s in collection.samples)
                if step > 1:
                    results[name].append({"seconds": seconds, "rounds": collection.num_rounds, "tokens": generated,
                                          "early_s": collection.early_s, "tail_s": collection.tail_s})
                print(f"step {step} overlap {name:3s}: {seconds:6.2f} s, {collection.num_rounds} rounds, "
                      f"{generated} tokens generated, tail {collection.tail_s:.2f} s, early {collection.early_s:.2f} s",
                      flush=True)
            assert kept_tokens["on"] == kept_tokens["off"], f"step {step}: overlap changed the kept sequences"
    finally:
        for _, runtime in arms.values():
            runtime.shutdown()

    summary = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()}
    ratio = sum(r["seconds"] for r in results["off"]) / sum(r["seconds"] for r in results["on"])
    print(f"steps {args.steps}: overlap off {sum(r['seconds'] for r in results['off']):.1f} s, on "
          f"{sum(r['seconds'] for r in results['on']):.1f} s: off/on {ratio:.2f} (generation time of the same steps, "
          "same kept groups)")
    print(json.dumps({"median_per_step": summary, "off_over_on": ratio}))


if __name__ == "__main__":
    main()
