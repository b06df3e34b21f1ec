#!/usr/bin/env bash
# GRPO training (megatron_minio3.trainer.grpo). Arguments are the trainer's: --config FILE key=value ...
#
#   examples/run_grpo.sh                      the CPU demo (`make demo`): configs/demo_cpu.yaml
#   examples/run_grpo.sh --config configs/qwen2_5_vl_7b_grpo.yaml model=/ckpt/sft data.train_files=[...]
#
# For the demo config the small generated checkpoint (outputs/demo/small_ckpt) and the synthetic
# visual-search dataset (outputs/demo/data) are created first when missing. Re-running continues from the
# latest checkpoint in trainer.output_dir (trainer.resume=true); start over with trainer.resume=false
# and another trainer.output_dir, or remove outputs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEMO_CONFIG=configs/demo_cpu.yaml

[ $# -eq 0 ] && set -- --config "$DEMO_CONFIG"
if [[ " $* " == *" $DEMO_CONFIG "* || " $* " == *" --config=$DEMO_CONFIG "* ]]; then
  if [ ! -f outputs/demo/small_ckpt/config.json ]; then
    echo "== creating the small random-weight Qwen2.5-VL checkpoint (outputs/demo/small_ckpt)"
    "$PYTHON" tools/make_tiny_checkpoint.py --out outputs/demo/small_ckpt --size small
  fi
  if [ ! -f outputs/demo/data/visual_search.json ]; then
    echo "== creating the synthetic visual-search dataset (outputs/demo/data)"
    "$PYTHON" -m megatron_minio3.data.synthetic --out outputs/demo/data --num-samples 64 --width 448 --height 336
  fi
fi

started=$(date +%s)
echo "== GRPO: $*"
"$PYTHON" -m megatron_minio3.trainer.grpo "$@"
echo "== finished in $(( $(date +%s) - started )) s"
