#!/usr/bin/env python
"""PNG curves of a run from its metrics.jsonl: reward, accuracy per source, response length, turns, clip fraction,
KL, gradient norm, the parity probe and phase times (GRPO); loss, gradient norm, lr and throughput (SFT).

    python tools/plot_run.py RUN_DIR [-o OUT.png]      (default: RUN_DIR/curves.png)
"""
from megatron_minio3.trainer.plots import main

if __name__ == "__main__":
    raise SystemExit(main())
