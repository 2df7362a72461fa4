#!/usr/bin/env bash
# Installs GradMem's dependencies into the current Python (>= 3.11). Nothing of this repository is installed: the
# code runs from this checkout (`python3 run_....py` at the repository root).
#   bash scripts/setup.sh                runtime dependencies
#   bash scripts/setup.sh test           + test dependencies (pytest; triton and peft for their tests)
#   bash scripts/setup.sh gpu,lora       + optional extras, a comma list of: gpu (triton), lora (peft), wandb, all
#   bash scripts/setup.sh check          installs nothing, prints the torch report below
# torch is installed only when missing; TORCH_SPEC picks the build (default: torch==2.13.0, which CI installs as a
# CPU build from its local wheels; from PyPI on Linux x86_64 it is a CUDA build). At the end the script prints
# torch's version, its CUDA version and whether a GPU is visible, and warns when an NVIDIA GPU (nvidia-smi) is
# present but torch cannot use it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}

if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup.sh: $("$PY" -V 2>&1) found, GradMem needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

if [ "$EXTRAS" != "check" ]; then
    if ! "$PY" -c "import torch" >/dev/null 2>&1; then
        "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    fi
    "$PY" -m pip install -q ".${EXTRAS:+[$EXTRAS]}"
fi

"$PY" - <<'EOF'
import shutil
import subprocess
import sys

try:
    import torch
except ImportError:
    sys.exit("torch is not installed: run `bash scripts/setup.sh`")

cuda = torch.version.cuda
visible = torch.cuda.is_available()
gpu = f"yes ({torch.cuda.get_device_name(0)})" if visible else "no"
print(f"torch {torch.__version__}, CUDA {cuda or 'none (CPU-only build)'}, GPU visible: {gpu}")

nvidia_smi = shutil.which("nvidia-smi")
listed = nvidia_smi and subprocess.run([nvidia_smi, "-L"], capture_output=True, text=True, timeout=60).stdout.strip()
if listed and cuda is None:
    print(f"warning: this machine has an NVIDIA GPU ({listed.splitlines()[0]}) but torch {torch.__version__} is a "
          "CPU-only build, so everything would run on the CPU. Install a CUDA build, e.g. "
          f"`{sys.executable} -m pip install --force-reinstall torch=={torch.__version__.split('+')[0]} "
          "--index-url https://download.pytorch.org/whl/<cuda tag>` (pytorch.org lists the tags for your driver)",
          file=sys.stderr)
elif listed and not visible:
    print(f"warning: nvidia-smi lists a GPU but torch (a CUDA {cuda} build) sees none: check CUDA_VISIBLE_DEVICES "
          f"and that the driver supports CUDA {cuda} (`nvidia-smi` shows the highest CUDA version it supports)",
          file=sys.stderr)
EOF
