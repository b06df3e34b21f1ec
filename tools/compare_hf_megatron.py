"""Logit parity of a Megatron checkpoint against transformers, on text with images around it.

    torchrun --nproc_per_node $((TP*PP)) tools/compare_hf_megatron.py --hf-dir D --megatron-dir M --tp TP --pp PP \
        [--image a.png --image b.jpg] [--prompt "..."]

Runs the Megatron model (fp32) at the given TP/PP through megatron's pipeline schedule, runs the HF model
with transformers in one process, and prints one JSON line:
    {"max_abs_diff": ..., "mean_abs_diff": ..., "max_abs_logit": ..., "num_tokens": ..., "tp": ..., "pp": ...}
Without --image, two synthetic images of different sizes are used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint (reference weights, processor, tokenizer)")
    parser.add_argument("--megatron-dir", required=True, help="Megatron distributed checkpoint")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable); default: 2 synthetic")
    parser.add_argument("--prompt", default=None, help="question text placed after the images")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != args.tp * args.pp:
        print(f"error: run with tp*pp = {args.tp * args.pp} processes; this job has {world_size}", file=sys.stderr)
        return 2

    from megatron.core import parallel_state as mpu
    from transformers import AutoProcessor

    from megatron_minio3.convert.megatron_checkpoint import load_megatron_checkpoint
    from megatron_minio3.models.qwen2_5_vl.config import load_hf_config
    from megatron_minio3.models.qwen2_5_vl.forward import forward_logits
    from megatron_minio3.models.qwen2_5_vl.model import ModelOptions, build_model
    from megatron_minio3.models.qwen2_5_vl.parity import (
        DEFAULT_PROMPT,
        build_parity_inputs,
        hf_reference_logits,
        load_images,
        logit_difference,
        synthetic_images,
    )
    from megatron_minio3.parallel import destroy_parallel, init_parallel

    init_parallel(args.tp, args.pp)
    try:
        cfg = load_hf_config(args.hf_dir)
        model = build_model(cfg, ModelOptions())
        load_megatron_checkpoint(model, args.megatron_dir)
        processor = AutoProcessor.from_pretrained(args.hf_dir)
        images = load_images(args.image) if args.image else synthetic_images()
        inputs = build_parity_inputs(processor, cfg, [(images, args.prompt or DEFAULT_PROMPT)])
        logits = forward_logits(model, [inputs.megatron.to(next(model.parameters()).device)])
        if logits is not None and mpu.get_tensor_model_parallel_rank() == 0:
            reference = hf_reference_logits(args.hf_dir, inputs.hf)
            result = logit_difference(reference, logits[0].cpu(), inputs.valid_mask)
            print(json.dumps({**result, "tp": args.tp, "pp": args.pp}), flush=True)
    finally:
        destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
