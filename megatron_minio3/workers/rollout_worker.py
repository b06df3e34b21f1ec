"""The rollout side of one process: vLLM engines, the crop-tool agent loop and the parity probe's rollout.

`RolloutRuntime` is a plain object. Where it lives depends on `trainer.rollout_placement`:
- hybrid (the CPU default): inside the actor's rank process (workers/actor_worker.py), which alternates
  between rollout and training; weights go from Megatron into the engines in place, no copy.
- separate: inside `RolloutWorker`, a Ray actor of its own; weights arrive as buckets broadcast over a
  weight group (gloo on CPU, NCCL on GPU) from the actor's rank 0.
The controller calls the same methods in both cases (`generate`, `probe_rollout`, `evaluate`).
This module imports no Megatron code.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Sequence

from megatron_minio3.config.schema import Config
from megatron_minio3.data.minio3_json import Prompt
from megatron_minio3.rollout.agent_loop import RolloutBatch
from megatron_minio3.weights.probe import ParityProbe, ProbePrompt, ProbeSequence


class RolloutRuntime:
    """`rollout.num_engines` in-process vLLM engines sharing one agent loop."""

    def __init__(self, cfg: Config, probe_prompts: Sequence[Prompt], seed_offset: int = 0):
        from megatron_minio3.rollout.agent_loop import AgentLoop
        from megatron_minio3.rollout.engine import VllmEngine

        self.cfg = cfg
        # A resumed run must not replay the sampling stream of its first steps: offset the engine seed.
        rollout_cfg = dataclasses.replace(cfg.rollout, seed=cfg.rollout.seed + seed_offset)
        max_images = max(cfg.rollout.max_images, cfg.eval.max_images if cfg.trainer.eval_every else 0)
        self.engines = [
            VllmEngine(rollout_cfg, cfg.model, max_images=max_images) for _ in range(rollout_cfg.num_engines)
        ]
        # vLLM CPU pins its threads and then warns on every request that it ignores torch.set_num_threads.
        logging.getLogger("vllm.v1.worker.cpu_worker").setLevel(logging.ERROR)
        first = self.engines[0]
        self.loop = AgentLoop.from_config(self.engines, first.tokenizer, first.vision, rollout_cfg, cfg.data)
        self.probe = (
            ParityProbe(
                [ProbePrompt.from_prompt(prompt) for prompt in probe_prompts],
                max_tokens=cfg.weights.probe_max_tokens,
                warn_mean_abs_diff=cfg.weights.probe_warn_mean_abs_diff,
            )
            if probe_prompts
            else None
        )

    def generate(self, prompts: Sequence[Prompt], num_samples: int) -> RolloutBatch:
        return asyncio.run(self.loop.run(prompts, num_samples))

    def probe_rollout(self) -> list[ProbeSequence]:
        """Greedy two-turn probe sequences on the first engine (weights.probe_*)."""
        assert self.probe is not None, "probe_rollout without probe prompts"
        return asyncio.run(self.probe.rollout(self.engines[0], self.loop))

    def evaluate(self, output_dir: str) -> dict:
        """Avg@k on data.val_files with the current weights (trainer/eval.py), written under output_dir."""
        from megatron_minio3.trainer.eval import evaluate

        cfg = dataclasses.replace(self.cfg, eval=dataclasses.replace(self.cfg.eval, output_dir=output_dir))
        return evaluate(cfg, engines=self.engines)

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.shutdown()


class RolloutWorker:
    """Ray actor for `trainer.rollout_placement: separate`: a RolloutRuntime receiving weights over a group."""

    def __init__(self, cfg: Config, probe_prompts: Sequence[Prompt], seed_offset: int, env: dict[str, str]):
        os.environ.update(env)
        self.runtime = RolloutRuntime(cfg, probe_prompts, seed_offset)
        self.weight_group = None

    def generate(self, prompts: Sequence[Prompt], num_samples: int) -> RolloutBatch:
        return self.runtime.generate(prompts, num_samples)

    def probe_rollout(self) -> list[ProbeSequence]:
        return self.runtime.probe_rollout()

    def evaluate(self, output_dir: str) -> dict:
        return self.runtime.evaluate(output_dir)

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        """Rank `rank` (>= 1) of the weight group whose rank 0 is the actor's rank 0 (called at the same time)."""
        from megatron_minio3.weights.sync import WeightGroup

        self.weight_group = WeightGroup(host, port, rank, world_size, backend=backend)

    def receive_weights(self) -> dict[str, float]:
        """One sync: every engine of this worker loads each broadcast bucket as it arrives."""
        from megatron_minio3.weights.sync import receive_buckets

        assert self.weight_group is not None, "receive_weights before join_weight_group"
        bucket_bytes = min(engine.cfg.weight_bucket_mb for engine in self.runtime.engines) << 20
        num_tensors = 0
        for named_tensors in receive_buckets(self.weight_group, bucket_bytes):
            for engine in self.runtime.engines:
                num_tensors += engine.update_weights(named_tensors)
        return {"num_tensors": float(num_tensors)}

    def shutdown(self) -> None:
        self.runtime.shutdown()
