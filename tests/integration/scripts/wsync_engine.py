"""A vLLM engine in its own process that receives the actor's weights over a gloo weight group (rank 1).

Usage: python wsync_engine.py --hf-dir DIR --out-dir OUT --port PORT

Runs the parity probe (two greedy turns per fixed prompt, filling the prefix and encoder caches), receives
one weight sync from wsync_actor.py, runs the probe again and saves both runs to OUT/probe.pt.
"""
from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import torch

from megatron_minio3.rollout.agent_loop import AgentLoop
from megatron_minio3.rollout.engine import VllmEngine
from megatron_minio3.weights.sync import WeightGroup, receive_weights
from tests.integration.scripts.wsync_common import DATA_CFG, ENGINE_CFG, make_probe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    engine = VllmEngine(ENGINE_CFG, args.hf_dir)
    try:
        loop = AgentLoop.from_config([engine], engine.tokenizer, engine.vision, ENGINE_CFG, DATA_CFG)
        probe = make_probe()
        before = asyncio.run(probe.rollout(engine, loop))
        group = WeightGroup("127.0.0.1", args.port, rank=1, world_size=2, timeout_s=600)
        stats = receive_weights(engine, group)
        after = asyncio.run(probe.rollout(engine, loop))
        out = Path(args.out_dir)
        torch.save({"before": before, "after": after, "stats": stats}, out / "probe.pt.tmp")
        os.replace(out / "probe.pt.tmp", out / "probe.pt")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
