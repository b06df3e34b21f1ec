#!/usr/bin/env bash
# Cold-start SFT (megatron_minio3.trainer.sft). Arguments are the trainer's: --config FILE key=value ...
#
#   examples/run_sft.sh --config configs/qwen2_5_vl_7b_sft.yaml model=/ckpt/Qwen2.5-VL-7B-Instruct \
#       sft.train_files=[/data/minio3_coldstart.parquet]
#   examples/run_sft.sh --config configs/demo_sft_cpu.yaml          (the CPU demo's SFT stage; make demo runs it)
#
# Re-running continues from the latest checkpoint in trainer.output_dir; the final model is written as an HF
# checkpoint to <trainer.output_dir>/hf (sft.export_hf), the `model` of a GRPO or evaluation run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
[ $# -eq 0 ] && set -- --config configs/demo_sft_cpu.yaml
started=$(date +%s)
echo "== SFT: $*"
"$PYTHON" -m megatron_minio3.trainer.sft "$@"
echo "== finished in $(( $(date +%s) - started )) s"
