"""Throughput of the multi-turn crop-tool loop on one vLLM engine, as ratios measured in one run.

Usage: python tools/bench/rollout.py [--model DIR | --size tiny|small] [--num-prompts 16] [--n 4]
                                     [--max-turns 4] [--max-tokens-per-turn 96] [--repeats 3]

Ways to generate on the same engine, caches reset before each measurement, every request with a seed of its
own (rollout/seeds.py), so that every repeat and both loop modes generate exactly the same tokens:
  async    the agent loop: each trajectory submits its next turn as soon as its tool result is ready;
  sync     the same loop turn-synchronously: a turn starts when every trajectory finished the previous one;
  single   one single-turn request per trajectory, with the same first prompt and image, generating exactly
           that trajectory's number of generated tokens (end-of-turn tokens banned): the same token count
           with no tool round trips, no observation prefill and no crops to encode.
  single (same work)
           one single-turn request per trajectory whose prompt is the trajectory's whole context less its generated
           tokens (the first prompt and every observation turn, with every image: prompt image and crops), generating
           the trajectory's number of tokens under the [a-z ]* constraint: the engine computes the same prompt tokens,
           encodes the same images and generates the same number of constrained tokens as the loop, in one turn.
           async/single_same_work is the cost of the turns themselves (round trips, admissions spread over steps,
           encoder calls per crop); async/single_constrained adds the work the workload's observations bring (on a
           CPU prefill and image encoding cost about as much per token as decoding, on a GPU far less).
A generated random-weight checkpoint never calls the tool by itself, so the loop's turns are constrained to
think/zoom/answer with a regex (vLLM structured outputs), which costs a grammar check per request and a token
mask per step that plain generation does not pay; "single (constrained)" generates the same token counts under
a constraint of the same kind ([a-z ]*), so async/single_constrained is the cost of the tool loop alone.
Printed: tokens/s of each; the ratios; per mode the engine's steps, busy share, prefix-cache hit rate of later
turns and images encoded (rollout/engine.py: EngineStats); and the step bound of the workload: a turn-synchronous
loop needs at least sum over turns of the longest turn, an asynchronous one the longest trajectory, so their
ratio caps what async can gain over sync when a step costs the same whatever it holds (this CPU machine).
Figures go in docs/rollout.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path



def guided_regex(think_min: int, think_max: int) -> str:
    """Think (a random length within the bounds), then zoom into the original or an observation, or answer."""
    return (
        rf"<think>[a-z ]{{{think_min},{think_max}}}</think>("
        r'<grounding>\{"bbox_2d": \[0\.[0-4], 0\.[0-4], 0\.[5-9], 0\.[5-9]\], "source": "(original_image|observation_[1-3])"\}</grounding>'
        r"|<answer>\([A-D]\)</answer>)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="HF checkpoint (default: generate one of --size)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-tokens-per-turn", type=int, default=96)
    parser.add_argument("--think-min", type=int, default=4, help="bounds of the reasoning text of a turn (chars);")
    parser.add_argument("--think-max", type=int, default=24, help="a wide range gives turns of uneven length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv-cache-mb", type=int, default=512)
    parser.add_argument("--dtype", default="auto")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from megatron_minio3.config.data import DataConfig
    from megatron_minio3.config.rollout import RolloutConfig
    from megatron_minio3.data.images import load_image
    from megatron_minio3.data.minio3_json import read_minio3_json
    from megatron_minio3.data.synthetic import VisualSearchSpec, write_visual_search_dataset
    from megatron_minio3.rollout.agent_loop import AgentLoop, GenerationRequest
    from megatron_minio3.rollout.engine import VllmEngine

    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model = args.model
    if not model:
        from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(work / "ckpt", size=args.size))
    spec = VisualSearchSpec(width=672, height=504, num_distractors=20, question_kinds=("mc",))
    prompts = read_minio3_json(write_visual_search_dataset(work / "data", args.num_prompts, seed=0, spec=spec))
    cfg = RolloutConfig(
        max_turns=args.max_turns,
        max_tokens_per_turn=args.max_tokens_per_turn,
        max_total_tokens=4096,
        context_reserve_tokens=128,
        dtype=args.dtype,
        kv_cache_memory_mb=args.kv_cache_mb,
        enforce_eager=True,
        max_num_seqs=max(64, args.num_prompts * args.n),
        guided_regex=guided_regex(args.think_min, args.think_max),
    )
    data = DataConfig(min_pixels=3136, max_pixels=100_000)
    engine = VllmEngine(cfg, model)
    loop = AgentLoop.from_config([engine], engine.tokenizer, engine.vision, cfg, data)
    end_ids = tuple({engine.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})
    first_prompts = {
        prompt.uid: (
            loop.turns.prompt_ids(prompt.question, 1),
            [loop.model_image(load_image(prompt.image_paths[0]), loop.image_resample)],
        )
        for prompt in prompts
    }

    seeds = list(range(len(prompts)))
    engine_stats: dict[str, list] = {}

    def measured(name: str, run):
        engine.reset_caches()
        engine.stats(reset=True)
        started = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - started
        engine_stats.setdefault(name, []).append((engine.stats(reset=True), seconds))
        return result, seconds

    def run_loop(turn_synchronous: bool):
        name = "sync" if turn_synchronous else "async"
        batch, seconds = measured(name, lambda: asyncio.run(
            loop.run(prompts, args.n, turn_synchronous=turn_synchronous, seeds=seeds)))
        return sum(t.num_generated_tokens for t in batch.trajectories), seconds, batch

    def run_single(trajectories, guided: bool = False, same_work: bool = False):
        """One single-turn request per trajectory, generating its number of tokens (see the module docstring)."""

        def request(index: int, traj) -> GenerationRequest:
            if same_work:
                prompt_ids, images = whole_context(traj, loop.turns.image_pad_id), [i.model for i in traj.images]
            else:
                prompt_ids, images = first_prompts[traj.uid]
            return GenerationRequest(
                request_id=f"single-{index}-{next(loop.request_counter)}",
                prompt_token_ids=prompt_ids,
                images=images,
                image_ids=tuple(i.content_id for i in traj.images) if same_work else (),
                max_tokens=traj.num_generated_tokens,
                sampling=loop.sampling,
                stop=tuple(cfg.stop),
                banned_token_ids=loop.turns.placeholder_ids + end_ids,
                guided_regex="[a-z ]*" if guided else "",
                seed=index,
            )

        async def generate_all():
            requests = [request(index, traj) for index, traj in enumerate(trajectories)]
            return await asyncio.gather(*(engine.generate(r) for r in requests))

        name = "single (same work)" if same_work else "single (constrained)" if guided else "single"
        assert guided or not same_work, "the same work as the loop's constrained turns is constrained"
        results, seconds = measured(name, lambda: asyncio.run(generate_all()))
        return sum(len(r.token_ids) for r in results), seconds

    run_loop(False)  # warm-up: first requests, structured-output grammar compilation
    rates: dict[str, list[float]] = {"async": [], "sync": [], "single": [], "single (constrained)": [],
                                     "single (same work)": []}
    turns, tokens, bounds = [], [], []
    for _ in range(args.repeats):
        generated, seconds, batch = run_loop(False)
        rates["async"].append(generated / seconds)
        turns.append(sum(t.num_turns for t in batch.trajectories) / len(batch.trajectories))
        tokens.append(generated)
        for name, options in (("single", {}), ("single (constrained)", {"guided": True}),
                              ("single (same work)", {"guided": True, "same_work": True})):
            single_tokens, single_seconds = run_single(batch.trajectories, **options)
            assert single_tokens == generated, (name, single_tokens, generated)
            rates[name].append(single_tokens / single_seconds)
        sync_generated, sync_seconds, _ = run_loop(True)
        assert sync_generated == generated, (sync_generated, generated)  # the seeds make both loops generate alike
        rates["sync"].append(sync_generated / sync_seconds)
        bounds.append(step_bounds(batch.trajectories))
    engine.shutdown()

    median = {name: statistics.median(values) for name, values in rates.items()}
    print(f"model {model} | {args.num_prompts} prompts x {args.n} samples, up to {args.max_turns} turns of up to "
          f"{args.max_tokens_per_turn} tokens, think {args.think_min}-{args.think_max} chars | "
          f"{statistics.mean(turns):.2f} turns and {statistics.mean(tokens):.0f} generated tokens per batch on average | "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for name, values in rates.items():
        print(f"  {name:20s} {median[name]:8.1f} tokens/s  (runs: {', '.join(f'{v:.1f}' for v in values)})")
    ratios = {
        "async/single": median["async"] / median["single"],
        "async/single_constrained": median["async"] / median["single (constrained)"],
        "async/single_same_work": median["async"] / median["single (same work)"],
        "sync/single": median["sync"] / median["single"],
        "async/sync": median["async"] / median["sync"],
        "single_constrained/single": median["single (constrained)"] / median["single"],
    }
    for name, value in ratios.items():
        print(f"  {name:26s} {value:.2f}")
    engine = {}
    for name, runs in engine_stats.items():
        metrics = [stats.metrics(seconds) for stats, seconds in runs[1:] or runs]  # the warm-up left out
        engine[name] = {key.removeprefix("rollout/engine/"): statistics.median(m[key] for m in metrics)
                        for key in metrics[0]}
        print(f"  engine, {name:20s} " + ", ".join(f"{key} {value:.2f}" for key, value in engine[name].items()))
    sync_bound, async_bound = (statistics.mean(b[i] for b in bounds) for i in (0, 1))
    print(f"  step bound: turn-synchronous {sync_bound:.0f} steps, asynchronous {async_bound:.0f} steps "
          f"(ratio {sync_bound / async_bound:.2f}: the most async can gain where a step costs the same whatever it holds)")
    print(json.dumps({"tokens_per_s": median, "ratios": ratios, "turns_mean": statistics.mean(turns), "engine": engine,
                      "step_bound": {"sync": sync_bound, "async": async_bound}}))


def whole_context(traj, image_pad_id: int) -> list[int]:
    """The trajectory's tokens less the generated ones (loss mask 1), each image's pad run back to one pad: the first
    prompt and every observation turn, as one prompt (GenerationRequest takes one pad per image)."""
    compact: list[int] = []
    for token, generated in zip(traj.token_ids, traj.loss_mask):
        if generated or (token == image_pad_id and compact and compact[-1] == image_pad_id):
            continue
        compact.append(token)
    assert compact.count(image_pad_id) == len(traj.images), "every image is one pad run"
    return compact


def step_bounds(trajectories) -> tuple[int, int]:
    """(turn-synchronous, asynchronous) lower bounds on the engine steps of a batch: a step makes one token of each
    request in it, so lock-step turns need the sum over turns of the longest turn, free-running trajectories the
    longest trajectory (generated tokens; prefill steps not counted)."""
    longest_turn: dict[int, int] = {}
    for traj in trajectories:
        for index, turn in enumerate(traj.turns):
            longest_turn[index] = max(longest_turn.get(index, 0), turn.num_generated_tokens)
    return sum(longest_turn.values()), max(traj.num_generated_tokens for traj in trajectories)


if __name__ == "__main__":
    main()
