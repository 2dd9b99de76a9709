#!/usr/bin/env bash
# Fill .whl/ with the wheels that scripts/gpu_check.sh needs on the GPU image (Python 3.12, x86-64,
# no network there): the server's stack (fastapi, uvicorn, pydantic-settings) and the tests' client
# (openai), with everything they need, at the versions installed here. That image has torch,
# transformers, tokenizers, safetensors, typer, rich, httpx, prometheus-client, pyyaml, pytest,
# pytest-timeout, scipy and psutil already (see the device notes), so those stay out.
#
#   scripts/gpu_wheels.sh                       versions of python3's environment
#   PYTHON=.venv/bin/python scripts/gpu_wheels.sh
#
# .whl/ is git-ignored; the device call names it in `carry` (about 7 MiB) and gpu_check.sh installs it.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DEST="$REPO/.whl"
ROOTS=(fastapi uvicorn pydantic-settings openai)

rm -rf "$DEST"
mkdir -p "$DEST"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
# pin whatever this environment has (local builds such as torch+cpu are not in the closure: dropped)
"$PY" -m pip freeze 2>/dev/null | grep -v -E '@|^-e|\+' >"$constraints" || true
"$PY" -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -c "$constraints" -d "$DEST" "${ROOTS[@]}"
ls "$DEST"
du -sh "$DEST"
