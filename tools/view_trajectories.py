#!/usr/bin/env python
"""Write a static HTML viewer of a trajectory dump (eval or training rollout): no server needed.

    python tools/view_trajectories.py RUN_DIR/eval/step_N [-o out.html] [--max-prompts N] [--embed]

DUMP is the directory write_trajectories wrote (trajectories.jsonl + images/) or the jsonl file itself.
Images are linked by relative path from the HTML file (keep it where it was written, or next to the dump);
--embed puts them into the file as data URIs, so the HTML can be moved or sent on its own.
The logic lives in megatron_minio3/viewer.py; docs/viewer.md describes the page.
"""
from __future__ import annotations

import argparse
import sys

from megatron_minio3.viewer import build_viewer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dump", help="dump directory (with trajectories.jsonl) or the jsonl file")
    parser.add_argument("-o", "--out", default=None, help="output HTML file (default: DUMP_DIR/trajectories.html)")
    parser.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts of the dump")
    parser.add_argument("--embed", action="store_true", help="embed the images as data URIs (a portable file)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.max_prompts is not None and args.max_prompts < 1:
        parser.error("--max-prompts must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = build_viewer(
            args.dump, args.out, max_prompts=args.max_prompts, embed=args.embed, log=None if args.quiet else sys.stderr
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"view_trajectories: {exc}", file=sys.stderr)
        return 1
    print(stats.out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
