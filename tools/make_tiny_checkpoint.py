#!/usr/bin/env python
"""Write an offline Qwen2.5-VL HF checkpoint with random weights.

    python tools/make_tiny_checkpoint.py --out DIR [--size tiny|small] [--seed N] [--num-layers 4 ...]

`tiny` (about 1M parameters) is for tests; `small` (about 30M) for the CPU demo. Same arguments, same bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from megatron_minio3.models.qwen2_5_vl.tiny_checkpoint import SIZES, TinyArch, make_tiny_checkpoint


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    for f in dataclasses.fields(TinyArch):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("mrope_section", "fullatt_block_indexes"):
            parser.add_argument(flag, type=_int_list, default=None, help="comma-separated integers")
        elif f.type in ("bool",):
            parser.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        elif f.type in ("float",):
            parser.add_argument(flag, type=float, default=None)
        else:
            parser.add_argument(flag, type=int, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TinyArch)
        if f.name != "extra" and getattr(args, f.name) is not None
    }
    start = time.time()
    try:
        out = make_tiny_checkpoint(args.out, size=args.size, seed=args.seed, **overrides)
    except ValueError as err:
        print(f"make_tiny_checkpoint: {err}", file=sys.stderr)
        return 2
    size_bytes = sum(p.stat().st_size for p in out.iterdir())
    print(json.dumps({"out": str(out), "size": args.size, "seed": args.seed, "bytes": size_bytes,
                      "seconds": round(time.time() - start, 1), **overrides}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
