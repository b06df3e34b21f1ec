"""HF Qwen2.5-VL safetensors -> Megatron distributed checkpoint (torch_dist), loadable at any TP/PP.

    torchrun --nproc_per_node $((TP*PP)) tools/convert_hf_to_megatron.py --hf-dir D --out-dir M --tp TP --pp PP

Each rank builds only its own shard of the model (its parameters are never filled) and writes it parameter by
parameter, reading only the slices of the HF tensors it needs just before each is written, so a process holds
about one parameter (at most 512 MiB of computed values at once, or the largest parameter) above the
interpreter's start-up memory, not its share of the model. TP=PP=1 runs as a plain `python` command.
"""
from __future__ import annotations

import argparse
import os
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("--out-dir", required=True, help="Megatron checkpoint directory to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this conversion job")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this conversion job")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="parameter dtype (auto: the HF tensors')")
    parser.add_argument("--overwrite", action="store_true", help="replace --out-dir if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != args.tp * args.pp:
        print(
            f"error: run with tp*pp = {args.tp * args.pp} processes (torchrun --nproc_per_node {args.tp * args.pp}); "
            f"this job has {world_size}",
            file=sys.stderr,
        )
        return 2

    import torch

    from megatron_minio3.convert.hf_to_megatron import convert_hf_to_megatron
    from megatron_minio3.parallel import destroy_parallel, init_parallel

    init_parallel(args.tp, args.pp, backend="gloo")
    try:
        metadata = convert_hf_to_megatron(
            args.hf_dir,
            args.out_dir,
            params_dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
            overwrite=args.overwrite,
        )
    finally:
        destroy_parallel()
    if int(os.environ.get("RANK", "0")) == 0:
        text = metadata.model_config.text
        print(
            f"wrote {args.out_dir}: {text.num_layers} layers, hidden {text.hidden_size}, "
            f"HF naming '{metadata.hf_naming}', converted at TP={args.tp} PP={args.pp}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
