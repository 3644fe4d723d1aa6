#!/usr/bin/env bash
# Wheels for a GPU machine that has python3 + torch but no registry (an H200 machine without network access: Python 3.12,
# torch 2.11). Writes .whl/ (git-ignored, ~8 MB); there:
#   python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py
# DALI is not among them: its wheel (~476 MB installed) is too big to carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
rm -rf .whl && mkdir -p .whl
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do plat+=(--platform "$p"); done
# pure-Python or binary wheels from the registry, at the versions constraints.txt pins where it pins them
pins() { grep -E "^($1)==" constraints.txt | tr '\n' ' '; }
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${plat[@]}" \
    -d .whl $(pins 'timm|webdataset|hydra-core') omegaconf==2.3.0 braceexpand hjson pydantic annotated-types \
    typing-inspection typing_extensions
core=$(unzip -p .whl/pydantic-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\(.*\)$/\1/p')
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${plat[@]}" \
    -d .whl "pydantic-core==$core"
# sdist-only packages, built here as pure-Python wheels (deepspeed builds no ops ahead: it JIT-compiles them)
$PY -m pip wheel -q --no-deps --no-build-isolation -w .whl $(pins 'deepspeed|fairscale') antlr4-python3-runtime==4.9.3
ls -1 .whl
