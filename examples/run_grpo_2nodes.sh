#!/usr/bin/env bash
# Mini-o3 GRPO at 32B on 2 nodes x 8 GPUs: configs/qwen2_5_vl_32b_grpo.yaml (actor TP8 x DP2 = 16 ranks, one
# colocated vLLM engine per 4 GPUs, so 4 rollout handles). Every node needs this repository and its venv at the
# same path (`make setup`), and trainer.output_dir on a filesystem all nodes share (every rank writes its
# checkpoint shards there).
#
#   any machine:  examples/run_grpo_2nodes.sh plan  model=/ckpt/minio3-32b-sft data.train_files=[...] ...
#                 (the launch plan: ranks and engines per node, memory per GPU per phase; no GPU needed)
#   node 0:       examples/run_grpo_2nodes.sh head
#   node 1:       examples/run_grpo_2nodes.sh worker NODE0_ADDRESS
#   node 0:       examples/run_grpo_2nodes.sh train model=/ckpt/minio3-32b-sft data.train_files=[...] \
#                     data.image_dir=/data/minio3 data.val_files=[...]
#   any node:     examples/run_grpo_2nodes.sh stop
#
# The trainer joins the cluster through RAY_ADDRESS, places the 16 actor ranks as one 8-GPU placement group per
# node (TP groups and engines never straddle nodes) and fails with the nodes' GPU counts if they cannot be placed.
# Another config: CONFIG=configs/... examples/run_grpo_2nodes.sh train ...
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/qwen2_5_vl_32b_grpo.yaml}
PORT=${RAY_PORT:-6379}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
role=${1:-}
shift || true
case "$role" in
  plan)
    exec python -m megatron_minio3.trainer.grpo --config "$CONFIG" --dry-run "$@" ;;
  head)
    exec ray start --head --port="$PORT" --num-gpus="$GPUS_PER_NODE" --disable-usage-stats ;;
  worker)
    [ $# -ge 1 ] || { echo "usage: $0 worker NODE0_ADDRESS" >&2; exit 2; }
    exec ray start --address="$1:$PORT" --num-gpus="$GPUS_PER_NODE" --disable-usage-stats ;;
  train)
    RAY_ADDRESS=${RAY_ADDRESS:-auto} exec bash examples/run_grpo.sh --config "$CONFIG" "$@" ;;
  stop)
    exec ray stop ;;
  *)
    sed -n '2,17p' "$0"; exit 2 ;;
esac
