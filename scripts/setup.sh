#!/usr/bin/env bash
# Installs GradMem and its dependencies into the current Python (>= 3.11).
#   bash scripts/setup.sh        runtime dependencies
#   bash scripts/setup.sh test   runtime + test dependencies
# torch is installed only when missing; TORCH_SPEC picks the build (default: torch==2.13.0, the CPU build that the
# CI machines have cached; on a GPU machine pip's default wheel is a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
"$PY" -m pip install -q -e ".${extra}"
