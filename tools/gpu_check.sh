#!/usr/bin/env bash
# One GPU check of the Megatron actor on one H100/H200, in at most 9 minutes, with only PyTorch + transformers
# installed and no network (megatron-core comes from the wheels in .whl/: bash tools/fetch_gpu_wheels.sh here,
# then the device tool's `carry: [".whl"]`). Usage:
#     bash tools/gpu_check.sh [OUT_JSON]      # default $OUT/gpu_check.json ($OUT: the device tool's folder)
#     bash tools/gpu_check.sh --cpu-smoke     # tiny shapes, one step each, on this machine's CPU (before GPU time)
# Parts (each one process of tools/bench/actor_step.py under `timeout`; a part that fails or hangs is recorded and
# the rest go on; all limits are cut to what is left of a 510 s budget, GPU_CHECK_BUDGET_S, so the whole
# script ends within 9 minutes):
#   layers  the most 7B-width decoder layers whose planner train estimate (seq SEQ, recompute none, bf16, with
#           Adam state) fits 80% of the GPU's memory, at most 14
#   parity  (b) log-probs of a generated mid-size model (hidden 1024, 8 layers): bf16 vs fp32 on the packed
#           training path, and Megatron fp32/bf16 and transformers bf16 against transformers fp32 on the HF parity
#           sample
#   mfu_*   (a) + (c) 7B-width model, vision tower of 32 blocks, packed multimodal micro-batches (SEQ / 1024
#           trajectories of 2 images of 448 px each: half of the tokens are image tokens), bf16: GRPO updates
#           (MegatronActor.update) timed, MFU against 989 TFLOP/s, peak max_memory_allocated next to the planner's
#           train estimate: long_none (SEQ tokens, no recompute), long_full (full recompute), short_none (SEQ / 2);
#           2 x SEQ tokens per update each. SEQ = 8192 where 4+ layers fit (H200), else 4096 or 2048 (H100)
#   attn    varlen (THD) vs [T, T] masked attention at 7B width, 4 layers, vision depth 8, seq SEQ
# Writes OUT_JSON (every part's results, exit status and time) and prints a readable summary.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

SMOKE=0
OUT_JSON=""
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) OUT_JSON=$arg ;;
  esac
done
OUT_JSON=${OUT_JSON:-${OUT:-/tmp}/gpu_check.json}
mkdir -p "$(dirname "$OUT_JSON")"
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
BUDGET=${GPU_CHECK_BUDGET_S:-510}  # parts end by then (+5 s to kill one); the summary has 20 s more: < 9 min
START=$(date +%s)
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
BENCH=(tools/bench/actor_step.py)
PARTS=()

elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "== [$(elapsed) s] $*"; }

# run_part NAME LIMIT_S COMMAND...: the command under timeout (cut to the budget left), its output to the console
# and to $WORK/NAME.log, its exit status and seconds to $WORK/NAME.status
run_part() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - $(elapsed) - 5 ))
  (( limit > left )) && limit=$left
  PARTS+=("$name")
  if (( limit < 20 )); then
    note "$name: skipped, ${left} s of the budget left"
    echo "skipped 0 $limit" > "$WORK/$name.status"
    return
  fi
  note "$name (limit ${limit} s): $*"
  local begin=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$WORK/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$rc $(( $(date +%s) - begin )) $limit" > "$WORK/$name.status"
  if (( rc == 124 || rc == 137 )); then
    note "$name: TIMED OUT after ${limit} s"
  elif (( rc )); then
    note "$name: exit status $rc"
  fi
}

# ---------------------------------------------------------------------------------------------- environment
note "gpu_check: $( ((SMOKE)) && echo 'CPU smoke' || echo GPU ) run, budget ${BUDGET} s, results -> $OUT_JSON"
if ! timeout 60 "$PYTHON" -c "import megatron.core" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    note "installing $(ls .whl | tr '\n' ' ')into /tmp/site"
    timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || { echo "error: wheel install failed"; }
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
  else
    echo "error: megatron.core is not importable and .whl/ holds no wheels (bash tools/fetch_gpu_wheels.sh)" >&2
  fi
fi
timeout 60 "$PYTHON" - > "$WORK/environment.json" 2>"$WORK/environment.err" <<'EOF'
import importlib.metadata as md, json, platform, subprocess
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
for name in ("megatron-core", "transformers", "transformer-engine", "flash-attn", "numpy"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, sm_count=p.multi_processor_count)
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except Exception as err:  # noqa: BLE001
        info["nvidia_smi"] = str(err)
print(json.dumps(info))
EOF
cat "$WORK/environment.json"; cat "$WORK/environment.err" >&2

# ---------------------------------------------------------------------------------------------- parts
# micro-batches of SEQ tokens: SEQ / 1024 trajectories, 2 images of 448 px (256 tokens) each: half image tokens
if (( SMOKE )); then
  GPU_GIB=80  # pretended, for the planner's layer count; the model parts run the demo shape
else
  GPU_GIB=$(python3 -c "import json; print(json.load(open('$WORK/environment.json')).get('gpu_memory_gib', 80))" \
            2>/dev/null || echo 80)
fi
BUDGET_GIB=$(python3 -c "print(round(0.8 * float('$GPU_GIB'), 1))")
# the longest micro-batch (8192, else 4096, else 2048 tokens) at which 4+ layers fit without recompute
for SEQ in 8192 4096 2048; do  # planner only: no model is built
  run_part "layers_s$SEQ" 60 "$PYTHON" "${BENCH[@]}" --fit-layers "$BUDGET_GIB" --shape 7b --recompute none \
    --seq-len "$SEQ" --seqs-per-micro-batch $(( SEQ / 1024 )) --images-per-seq 2 --image-size 448 \
    --json "$WORK/layers_s$SEQ.json"
  LAYERS=$(python3 -c "import json; print(json.load(open('$WORK/layers_s$SEQ.json'))['layers'])" 2>/dev/null || echo 0)
  (( LAYERS >= 4 )) && break
done
LAYERS=$(( LAYERS > 14 ? 14 : (LAYERS < 1 ? 1 : LAYERS) ))
HALF=$(( SEQ / 2 ))
note "7B-width model: $LAYERS decoder layers fit ${BUDGET_GIB} GiB at seq $SEQ without recompute (planner)"

if (( SMOKE )); then  # every model part on the demo shape, one step
  SHAPE=(--shape demo --layers 2 --vision-depth 2 --image-size 168 --images-per-seq 1 --seqs-per-micro-batch 2)
  STEPS=(--warmup 0 --steps 1)
  PARITY=(--parity --parity-size tiny --seq-len 256 --seqs-per-micro-batch 2 --images-per-seq 1 --image-size 168)
  BIG=(--seq-len 512 --micro-batches 1)
  SMALL=(--seq-len 256 --micro-batches 2)
  ATTN=(--shape demo --seq-len 512 --seqs-per-micro-batch 2 --images-per-seq 1 --micro-batches 1 --warmup 0 --steps 1)
  DTYPE=(--dtype fp32)
else
  SHAPE=(--shape 7b --layers "$LAYERS" --image-size 448 --images-per-seq 2)
  STEPS=(--warmup 2 --steps 4)
  PARITY=(--parity --parity-size mid --seq-len 4096 --seqs-per-micro-batch 4 --images-per-seq 2 --image-size 448)
  BIG=(--seq-len "$SEQ" --seqs-per-micro-batch $(( SEQ / 1024 )) --micro-batches 2)  # 2 x SEQ tokens per update
  SMALL=(--seq-len "$HALF" --seqs-per-micro-batch $(( HALF / 1024 )) --micro-batches 4)  # the same tokens
  ATTN=(--shape 7b --layers 4 --vision-depth 8 --image-size 448 --images-per-seq 2 --seq-len "$SEQ" \
        --seqs-per-micro-batch $(( SEQ / 1024 )) --micro-batches 1 --warmup 1 --steps 2)
  DTYPE=(--dtype bf16)
fi

run_part parity 150 "$PYTHON" "${BENCH[@]}" "${PARITY[@]}" --json "$WORK/parity.json"
for part in "long none" "long full" "short none"; do  # long: SEQ tokens per micro-batch, short: SEQ / 2
  set -- $part
  if [ "$1" = long ]; then SIZE=("${BIG[@]}"); else SIZE=("${SMALL[@]}"); fi
  run_part "mfu_$1_$2" 150 "$PYTHON" "${BENCH[@]}" "${SHAPE[@]}" "${SIZE[@]}" --recompute "$2" "${DTYPE[@]}" \
    "${STEPS[@]}" --json "$WORK/mfu_$1_$2.json"
done
run_part attn 120 "$PYTHON" "${BENCH[@]}" "${ATTN[@]}" --compare-attention "${DTYPE[@]}" --json "$WORK/attn.json"

# ---------------------------------------------------------------------------------------------- summary
note "summary"
timeout 20 python3 - "$WORK" "$OUT_JSON" "$SMOKE" "$LAYERS" "$BUDGET_GIB" "$SEQ" "${PARTS[@]}" <<'EOF'
import json, sys
from pathlib import Path

work, out, smoke, layers, budget_gib, seq, parts = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", \
    sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:]
GiB = 2**30

def load(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

report = {"mode": "cpu-smoke" if smoke else "gpu", "environment": load(work / "environment.json"),
          "layers_7b": int(layers), "seq_len_7b": int(seq), "planner_budget_gib": float(budget_gib), "parts": {}}
lines = [f"gpu_check ({report['mode']}): {report['environment']}"]
for name in parts:
    status = (work / f"{name}.status").read_text().split() if (work / f"{name}.status").exists() else ["?", "0", "0"]
    rc, seconds, limit = status
    log = (work / f"{name}.log").read_text(errors="replace").splitlines() if (work / f"{name}.log").exists() else []
    result = load(work / f"{name}.json")
    ok = rc == "0" and result is not None and "error" not in result
    state = {"124": "timed out", "137": "timed out (killed)", "skipped": "skipped"}.get(rc, "ok" if ok else "failed")
    entry = {"status": state, "exit_status": rc, "seconds": int(seconds), "limit_s": int(limit), "result": result}
    if not ok:
        entry["log_tail"] = log[-40:]
    report["parts"][name] = entry
    head = f"{name:<16} {state:<10} {seconds:>4} s"
    r = result or {}
    if state != "ok":
        lines.append(f"{head}  {r.get('error', '')[:200]}")
    elif name.startswith("layers"):
        lines.append(f"{head}  {r['layers']} layers fit {r['budget_gib']} GiB (estimate {r['estimate_gib']:.1f} GiB "
                     f"at seq {r['seq_len']}, recompute {r['recompute']})")
    elif name == "parity":
        keys = [k for k in ("packed_bf16_vs_fp32", "hf_bf16_vs_hf_fp32", "megatron_fp32_vs_hf_fp32",
                            "megatron_bf16_vs_hf_fp32") if k in r]
        lines.append(f"{head}  |dlogprob| max/mean: " + "; ".join(
            f"{k} {r[k]['max_abs_diff']:.2e}/{r[k]['mean_abs_diff']:.2e}" for k in keys)
            + (f"; HF failed: {r['hf_error']}" if "hf_error" in r else ""))
    else:
        est = r["planner_estimate"]
        for arm, a in r["arms"].items():
            mfu = "" if a["mfu"] is None else f"MFU {a['mfu']:.1%}, "
            peak = a.get("peak_memory_allocated_bytes")
            measured = (f"peak allocated {peak / GiB:.1f} GiB" if peak is not None
                        else f"peak RSS {r.get('peak_rss_bytes', 0) / GiB:.2f} GiB")
            lines.append(f"{head}  {arm}: {r['layers']}L seq {r['seq_len']} x{r['micro_batches']} recompute "
                         f"{r['recompute']} {r['dtype']}: {a['median_step_seconds']:.3f} s/step, "
                         f"{a['tokens_per_s']:.0f} tok/s, {a['model_tflops_per_gpu']:.1f} TFLOP/s, {mfu}{measured} "
                         f"vs planner {est['without_cuda_context_bytes'] / GiB:.1f} GiB (+2 GiB CUDA allowance)")
            head = " " * len(head)
        if "masked_over_varlen" in r:
            lines.append(f"{head}  masked / varlen = {r['masked_over_varlen']:.2f}")
report["summary"] = lines
Path(out).write_text(json.dumps(report, indent=1, default=str) + "\n")
print("\n".join(lines))
print(f"written: {out}")
failed = [n for n, e in report["parts"].items() if e["status"] != "ok"]
sys.exit(1 if failed else 0)
EOF
rc=$?
note "done in $(elapsed) s (exit status $rc)"
rm -rf "$WORK"
exit $rc
