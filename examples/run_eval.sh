#!/usr/bin/env bash
# Avg@k evaluation with the crop tool (megatron_minio3/trainer/eval.py); writes metrics.json and the
# trajectories (JSON lines plus every crop as images) to eval.output_dir.
#
#   examples/run_eval.sh --config configs/qwen2_5_vl_7b_grpo.yaml model=/ckpt/minio3-7b \
#       data.val_files=[/data/vstar.json,/data/hrbench4k.json] data.image_dir=/data/images eval.k=32
#
# Without arguments: a CPU smoke run on a generated tiny checkpoint and a synthetic visual-search set under
# outputs/eval-demo. Its weights are random, so its turns are constrained to the tool format
# (rollout.guided_regex) to exercise zooms and answers; the accuracy is chance level by design.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if [ "$#" -gt 0 ]; then
    exec "$PYTHON" -m megatron_minio3.trainer.eval "$@"
fi

OUT=outputs/eval-demo
[ -f "$OUT/ckpt/config.json" ] || "$PYTHON" tools/make_tiny_checkpoint.py --out "$OUT/ckpt" --size tiny
[ -f "$OUT/data/visual_search.json" ] || "$PYTHON" -m megatron_minio3.data.synthetic --out "$OUT/data" --num-samples 16
cat > "$OUT/eval.yaml" <<YAML
defaults: $(pwd)/configs/tiny_cpu.yaml
model: $OUT/ckpt
data:
  val_files: [$OUT/data/visual_search.json]
rollout:
  kv_cache_memory_mb: 256
  max_tokens_per_turn: 96
  guided_regex: '<think>[a-z ]{4,24}</think>(<grounding>\{"bbox_2d": \[0\.[0-4], 0\.[0-4], 0\.[5-9], 0\.[5-9]\], "source": "(original_image|observation_[1-3])"\}</grounding>|<answer>\([A-D]\)</answer>)'
reward:
  default_verifier: mc
eval:
  k: 4
  max_turns: 4
  output_dir: $OUT/results
YAML
exec "$PYTHON" -m megatron_minio3.trainer.eval --config "$OUT/eval.yaml"
