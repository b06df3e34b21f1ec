#!/usr/bin/env python
"""Translate the seed's `python3 -m verl.trainer.main_ppo ...` command into our YAML config, printing every flag it
mapped, every flag without a counterpart (and why) and where the YAML went (docs/from_verl.md).

    python tools/from_verl.py SCRIPT.sh [-o OUT.yaml] [--base configs/qwen2_5_vl_7b_grpo.yaml] [--env NAME=VALUE]
        [--model DIR] [--train-size N] [--set key=value]
    python tools/from_verl.py [-o OUT.yaml] ... -- actor_rollout_ref.rollout.n=16 data.train_batch_size=256 ...
"""
from megatron_minio3.config.from_verl import main

if __name__ == "__main__":
    raise SystemExit(main())
