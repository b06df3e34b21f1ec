#!/usr/bin/env bash
# Download the wheels tools/gpu_check.sh installs on a bare GPU machine (Python 3.12, x86-64, PyTorch and
# transformers already there, no network) into .whl/ beside the repository root: megatron-core 0.16.1, whose
# own requirements (torch>=2.6, numpy, packaging>=24.2: `unzip -p .whl/megatron_core-*.whl '*/METADATA' | grep
# ^Requires-Dist`) are in that image, as is everything else the actor imports (safetensors, pyyaml, pillow,
# tokenizers; requirements/gpu.txt). Transformer Engine and flash-attn are left out on purpose: gpu_check
# measures the local layer spec (PackedAttention on torch SDPA), the path a machine without them runs.
# .whl/ is kept out of git by .git/info/exclude (this script adds the line); the device tool carries it with
# `carry: [".whl"]`. Run from anywhere: bash tools/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(megatron-core==0.16.1)
MAX_MIB=40  # the carried tree is limited to 64 MiB in all
PYTHON=${PYTHON:-python3}

mkdir -p .git/info .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
for wheel in "${WHEELS[@]}"; do
  name=${wheel%%==*}
  version=${wheel##*==}
  stem=$(echo "$name" | tr '-' '_')
  for old in .whl/"$stem"-*.whl; do  # one version of each: two stop the whole install
    [ -e "$old" ] || continue
    case "$old" in .whl/"$stem-$version"-*) ;; *) echo "removing $old (not $version)"; rm -f "$old" ;; esac
  done
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$wheel"
done
for file in .whl/*.whl; do
  echo "$file requires: $(unzip -p "$file" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' \
    | sed 's/^Requires-Dist: //' | paste -sd ',' -)"
done
total_kib=$(du -sk .whl | cut -f1)
echo "total: $((total_kib / 1024)) MiB in .whl ($(ls .whl/*.whl | wc -l) wheel(s)); limit ${MAX_MIB} MiB"
if (( total_kib > MAX_MIB * 1024 )); then
  echo "error: .whl is over ${MAX_MIB} MiB" >&2
  exit 1
fi
