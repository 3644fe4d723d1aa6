#!/usr/bin/env bash
# DALI for a GPU machine that has no package registry and takes at most 64 MiB per transfer (the lent H200:
# Python 3.12, the working tree + carried paths travel with each `run` call; files stay there only while the
# machine is held, ~30 s idle between calls). DALI's wheel is ~190 MiB (476 MB installed), so it goes in parts.
#
#   here:   bash benchmarks/dali_to_device.sh prepare      # .dali/ (git-ignored): wheels -> one tar -> parts
#   there:  bash benchmarks/dali_to_device.sh receive NN   # one call per part, back to back (carry that part)
#   there:  bash benchmarks/dali_to_device.sh install      # join, check sha256, install into /tmp/site
#
# `prepare` prints the exact calls. Each `receive` copies its part out of the working tree to /tmp/dali_parts
# and checks its sha256; `install` (in the same call as the last part, then the measurement) joins them,
# checks the whole tar's sha256, and installs every wheel with pip --no-index --no-deps into /tmp/site
# (beside benchmarks/gpu_wheels.sh's). If the machine went back between calls, start again from part 00.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.dali                      # git-ignored (.gitignore)
PARTS=/tmp/dali_parts          # on the GPU machine, outside the working tree
SITE=${SITE:-/tmp/site}
PART_MIB=${PART_MIB:-56}       # <= 60: a part + the tracked tree (~1.3 MB) + SHA256SUMS stay under 64 MiB
PYVER=${PYVER:-3.12}
# DALI and its Requires-Dist (nvidia-dali-cuda130 2.4.0's METADATA) at the versions constraints.txt pins
WHEELS=(nvidia-dali-cuda130==2.4.0 astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0
        libcst==1.9.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-nvjpeg==13.3.2.43
        nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82)

case ${1:-} in
prepare)
    PY=${PY:-.venv/bin/python}
    rm -rf "$DIR" && mkdir -p "$DIR/wheels" "$DIR/parts"
    plat=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
        plat+=(--platform "$p")
    done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${plat[@]}" -d "$DIR/wheels" "${WHEELS[@]}"
    tar -C "$DIR" -cf "$DIR/dali.tar" wheels
    split -b "${PART_MIB}m" -d -a 2 "$DIR/dali.tar" "$DIR/parts/dali.tar.part"
    (cd "$DIR" && sha256sum dali.tar parts/dali.tar.part* > SHA256SUMS)
    rm "$DIR/dali.tar"
    n=$(ls "$DIR/parts" | wc -l)
    echo "wrote $n parts of <= $PART_MIB MiB under $DIR/parts ($(du -sh "$DIR/wheels" | cut -f1) of wheels). On the device," \
         "one run call each, back to back (the machine goes back after ~30 s idle):"
    parts=("$DIR"/parts/*)
    for part in "${parts[@]::${#parts[@]}-1}"; do
        echo "  run(command='bash benchmarks/dali_to_device.sh receive ${part##*part}', carry=['$part', '$DIR/SHA256SUMS'])"
    done
    last=${parts[-1]}
    echo "  run(command='bash benchmarks/dali_to_device.sh receive ${last##*part} && bash benchmarks/dali_to_device.sh install" \
         "&& python3 -m pip install -q --no-index --no-deps --target $SITE .whl/*.whl && PYTHONPATH=$SITE python3" \
         "benchmarks/gpu_check.py --only dali,data', carry=['$last', '$DIR/SHA256SUMS', '.whl'])" \
         "   # the last part is $(du -m "$last" | cut -f1) MiB; .whl: bash benchmarks/gpu_wheels.sh"
    ;;
receive)
    nn=${2:?usage: dali_to_device.sh receive NN}
    mkdir -p "$PARTS"
    cp "$DIR/parts/dali.tar.part$nn" "$DIR/SHA256SUMS" "$PARTS/"
    (cd "$PARTS" && grep " parts/dali.tar.part$nn\$" SHA256SUMS | sed 's# parts/# #' | sha256sum -c --quiet -)
    echo "dali part $nn: ok ($(ls "$PARTS"/dali.tar.part* | wc -l) parts here)"
    ;;
install)
    want=$(grep -c " parts/dali.tar.part" "$PARTS/SHA256SUMS")
    have=$(ls "$PARTS"/dali.tar.part* | wc -l)
    [[ $have == "$want" ]] || { echo "dali: $have of $want parts here; send the missing ones (receive NN)" >&2; exit 2; }
    cat "$PARTS"/dali.tar.part* > /tmp/dali.tar
    (cd /tmp && grep " dali.tar\$" "$PARTS/SHA256SUMS" | sha256sum -c --quiet -)
    rm -rf /tmp/dali_wheels && mkdir -p /tmp/dali_wheels && tar -C /tmp/dali_wheels -xf /tmp/dali.tar
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        /tmp/dali_wheels/wheels/*.whl
    PYTHONPATH=$SITE python3 -c "import nvidia.dali as d; print('dali', d.__version__, 'installed in $SITE')"
    ;;
*)
    echo "usage: $0 prepare | receive NN | install" >&2
    exit 2
    ;;
esac
