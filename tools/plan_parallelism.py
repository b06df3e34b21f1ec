"""Every TP x PP x CP x DP layout of N GPUs for a Qwen2.5-VL checkpoint: per-GPU memory by phase and component
under each activation-recompute mode (none, selective, full), an estimated step time, and the layouts that fit
ranked fastest first, with the config keys of the fastest (megatron_minio3/trainer/planner.py; formulas and
recommendations in docs/scaling.md). Needs only config.json. The selective mode reruns the base config's
actor.recompute_modules; cp > 1 rows are flagged (context parallel runs on the local layer spec, unmeasured on GPU).

    python tools/plan_parallelism.py --model /ckpt/Qwen2.5-VL-7B-Instruct/config.json --gpus 8 --gpu-mem 80 \\
        --seq-len 16384 --colocated
    python tools/plan_parallelism.py --model CKPT_DIR --gpus 16 --gpu-mem 80 --seq-len 16384 --colocated \\
        --config configs/qwen2_5_vl_32b_grpo.yaml [key=value ...]
    python tools/plan_parallelism.py --model CKPT_DIR --gpus 8 --gpu-mem 80 --seq-len 16384 --colocated \\
        actor.recompute_activations=true actor.recompute_granularity=selective \\
        actor.recompute_modules=[core_attn,mlp,layernorm]

Exit status 0 with the report; 2 with the reason on stderr for bad input (a missing config.json, a key missing
from it, a GPU count that does not fill whole nodes, ...).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_minio3.trainer.planner import (  # noqa: E402
    COLOCATED_DEFAULTS,
    H100_BF16_PEAK_FLOPS,
    PlannerSettings,
    StepTimeModel,
    format_plan,
    plan_parallelism,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the checkpoint's HF config.json, or its directory")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the actor (and colocated engines)")
    parser.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU, GiB (an 80 GB H100: 80)")
    parser.add_argument("--seq-len", type=int, required=True,
                        help="tokens of one packed micro-batch and of one sequence (the worst case)")
    parser.add_argument("--colocated", action="store_true",
                        help="vLLM engines share the actor GPUs (hybrid placement): engine weights + KV cache count")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--headroom", type=float, default=0.1, help="fits = peak phase <= (1 - this) x --gpu-mem")
    parser.add_argument("--rollout-tp", type=int, default=0,
                        help="colocated engines' TP (default 0: the smallest whose KV cache holds one sequence)")
    parser.add_argument("--image-fraction", type=float, default=None,
                        help="image tokens / tokens (default: the bound from data.max_pixels and rollout.max_images)")
    parser.add_argument("--image-pixels", type=int, default=None,
                        help="pixels of one image, for vision attention FLOPs (default: data.max_pixels)")
    parser.add_argument("--mfu", type=float, default=0.4, help="fraction of peak the matmuls reach (assumed)")
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK_FLOPS,
                        help="peak FLOP/s per GPU (default: H100/H200 dense bf16)")
    parser.add_argument("--global-batch", type=int, default=512,
                        help="micro-batches of --seq-len tokens per optimizer step, all DP replicas together "
                             "(default: the 7B recipe's ppo_mini_batch_size 32 x rollout.n 16)")
    parser.add_argument("--tp-comm-penalty", type=float, default=0.05,
                        help="step time x (1 + this x (tp - 1)): TP communication not hidden (assumed)")
    parser.add_argument("--cp-comm-penalty", type=float, default=0.05,
                        help="step time x (1 + this x (cp - 1)): CP communication not hidden (assumed)")
    parser.add_argument("--config", default=None,
                        help="the run's YAML config (dtype, freezing, reference model, rollout memory, max_pixels)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of --config, e.g. algorithm.kl_coef=0.001")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_minio3.config import load_config
    from megatron_minio3.trainer.launch_plan import load_hf_config_json

    try:
        hf_config = load_hf_config_json(args.model)
        defaults = [] if args.config or not args.colocated else list(COLOCATED_DEFAULTS)
        base = load_config(args.config, defaults + args.overrides) if args.config or args.overrides else None
        settings = PlannerSettings(
            num_gpus=args.gpus, gpu_memory_gb=args.gpu_mem, seq_len=args.seq_len, colocated=args.colocated,
            gpus_per_node=args.gpus_per_node, headroom=args.headroom, rollout_tp=args.rollout_tp,
            image_fraction=args.image_fraction, image_pixels=args.image_pixels,
            time=StepTimeModel(peak_flops=args.peak_flops, mfu=args.mfu, global_batch=args.global_batch,
                               tp_comm_penalty=args.tp_comm_penalty, cp_comm_penalty=args.cp_comm_penalty))
        plan = plan_parallelism(hf_config, settings, base)
    except ValueError as err:  # ConfigError is a ValueError too
        where = f"{args.model}: " if "config.json" in str(err) and str(args.model) not in str(err) else ""
        print(f"error: {where}{err}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
