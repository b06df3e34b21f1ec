#!/usr/bin/env bash
# `make demo`: the whole recipe on a CPU laptop, from nothing. A small generated Qwen2.5-VL checkpoint and the
# synthetic visual-search task (a small framed square among distractors: its colour is readable only after a
# zoom), then
#   1. evaluation of the untrained model                      outputs/demo/eval/before
#   2. cold-start SFT: a perception warm-up (the final crop alone -> its colour: what a pretrained VLM brings),
#      then the oracle trajectories (think, zoom, maybe a wrong zoom and a recovery, answer)
#   3. evaluation after SFT                                   outputs/demo/eval/sft
#   4. GRPO from the SFT model, free generation (no decoding constraint)
#   5. evaluation after GRPO                                  outputs/demo/eval/grpo
# and a table of accuracy per difficulty at each stage plus the curves (outputs/demo/report/{report.md,curves.png},
# sft_curves.png and grpo_curves.png: tools/plot_run.py) and the evaluation trajectories as web pages
# (outputs/demo/report/trajectories_*.html: tools/view_trajectories.py).
# Every stage is skipped when its output exists: a second run only prints the report (rm -rf outputs/demo to start
# over). Settings: configs/demo_cpu.yaml; extra key=value arguments go to every stage (e.g. trainer.total_steps=12).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
CONFIG=${CONFIG:-configs/demo_cpu.yaml}
PERCEPTION_CONFIG=${PERCEPTION_CONFIG:-configs/demo_sft_perception_cpu.yaml}
SFT_CONFIG=${SFT_CONFIG:-configs/demo_sft_cpu.yaml}
OUT=outputs/demo
EXTRA=("$@")
started=$(date +%s)
stage() { echo; echo "== [$(( $(date +%s) - started )) s] $*"; }

if [ ! -f "$OUT/ckpt/config.json" ]; then
  stage "a small random-weight Qwen2.5-VL checkpoint ($OUT/ckpt)"
  "$PYTHON" tools/make_tiny_checkpoint.py --out "$OUT/ckpt" --size tiny
fi
for split in "sft 480 1" "rl 256 2" "eval 96 3"; do
  set -- $split
  if [ ! -f "$OUT/data/$1/visual_search.json" ]; then
    stage "synthetic visual-search tasks: $1 ($2, easy/medium/hard)"
    "$PYTHON" -m megatron_minio3.data.synthetic --out "$OUT/data/$1" --num-samples "$2" --seed "$3" --width 672 --height 504
  fi
done
if [ ! -f "$OUT/data/sft/oracle.json" ]; then
  stage "oracle trajectories for SFT"
  "$PYTHON" -m megatron_minio3.data.oracle --tasks "$OUT/data/sft/visual_search.json" --out "$OUT/data/sft" --config "$CONFIG" \
    --perception-share 0.5
fi
evaluate() {  # evaluate NAME MODEL
  if [ ! -f "$OUT/eval/$1/metrics.json" ]; then
    stage "evaluation: $1"
    "$PYTHON" -m megatron_minio3.trainer.eval --config "$CONFIG" model="$2" eval.output_dir="$OUT/eval/$1" "${EXTRA[@]}"
  fi
}
evaluate before "$OUT/ckpt"
if [ ! -f "$OUT/sft_perception/hf/config.json" ]; then
  stage "SFT 1/2: perception warm-up (the final crop alone -> its colour)"
  "$PYTHON" -m megatron_minio3.trainer.sft --config "$PERCEPTION_CONFIG" model="$OUT/ckpt" \
    trainer.output_dir="$OUT/sft_perception" "${EXTRA[@]}"
fi
if [ ! -f "$OUT/sft/hf/config.json" ]; then
  stage "SFT 2/2: oracle trajectories"
  "$PYTHON" -m megatron_minio3.trainer.sft --config "$SFT_CONFIG" model="$OUT/sft_perception/hf" \
    trainer.output_dir="$OUT/sft" "${EXTRA[@]}"
fi
evaluate sft "$OUT/sft/hf"
if [ "${DEMO_STOP_AFTER:-}" = sft ]; then exit 0; fi  # tools/bench/learning.py runs its own GRPO seeds
if [ ! -f "$OUT/grpo/hf/config.json" ]; then
  stage "GRPO from the SFT model"
  "$PYTHON" -m megatron_minio3.trainer.grpo --config "$CONFIG" model="$OUT/sft/hf" trainer.output_dir="$OUT/grpo" "${EXTRA[@]}"
  last=$(ls -d "$OUT"/grpo/checkpoints/step_* | sort | tail -1)
  "$PYTHON" tools/convert_megatron_to_hf.py --megatron-dir "$last/model" --hf-config-dir "$OUT/sft/hf" --out-dir "$OUT/grpo/hf"
fi
evaluate grpo "$OUT/grpo/hf"
stage "report"
"$PYTHON" -m megatron_minio3.trainer.report --stage "before SFT=$OUT/eval/before" --stage "after SFT=$OUT/eval/sft" \
  --stage "after GRPO=$OUT/eval/grpo" --sft-metrics "$OUT/sft/metrics.jsonl" --grpo-metrics "$OUT/grpo/metrics.jsonl" \
  --out "$OUT/report"
"$PYTHON" tools/plot_run.py "$OUT/sft" -o "$OUT/report/sft_curves.png"
"$PYTHON" tools/plot_run.py "$OUT/grpo" -o "$OUT/report/grpo_curves.png"
for name in before sft grpo; do
  "$PYTHON" tools/view_trajectories.py "$OUT/eval/$name" -o "$OUT/report/trajectories_$name.html" --quiet
done
echo "== trajectories: open $OUT/report/trajectories_{before,sft,grpo}.html in a browser; TensorBoard: $OUT/grpo/tensorboard"
echo "== finished in $(( $(date +%s) - started )) s (trajectories: $OUT/eval/*/trajectories.jsonl)"
