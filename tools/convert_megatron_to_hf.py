"""Megatron distributed checkpoint (written by convert_hf_to_megatron.py or training) -> HF safetensors.

    python tools/convert_megatron_to_hf.py --megatron-dir M --out-dir D --hf-config-dir C

Runs in one process whatever TP/PP wrote the checkpoint; memory stays near one bucket of tensors
(--bucket-size) because tensors stream straight into size-capped shards (--max-shard-size, with an
index when there is more than one). config/tokenizer/processor files are copied from --hf-config-dir.
"""
from __future__ import annotations

import argparse
import re
import sys

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, '1000' -> 1000."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 5GB, 512MiB, 1000000)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--hf-config-dir", required=True, help="HF directory with config/tokenizer/processor files")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    parser.add_argument("--bucket-size", type=parse_size, default=parse_size("1GiB"),
                        help="how much is read from the Megatron checkpoint at a time")
    parser.add_argument("--dtype", choices=("original", "float32", "bfloat16", "float16"), default="original",
                        help="output dtype (original: each tensor's dtype in the HF checkpoint it came from)")
    parser.add_argument("--naming", choices=("original", "released", "transformers5"), default="original",
                        help="HF tensor-name layout (original: the layout of the checkpoint it came from)")
    parser.add_argument("--overwrite", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_minio3.convert.megatron_to_hf import convert_megatron_to_hf

    convert_megatron_to_hf(
        args.megatron_dir,
        args.out_dir,
        args.hf_config_dir,
        max_shard_bytes=args.max_shard_size,
        bucket_bytes=args.bucket_size,
        dtype=None if args.dtype == "original" else getattr(torch, args.dtype),
        naming=None if args.naming == "original" else args.naming,
        overwrite=args.overwrite,
    )
    print(f"wrote {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
