#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment with anomalib 2.7 for the peer benchmark
# (`mrkd bench --only anomalib`, benchmarks/bench_anomalib.py). It is kept apart from .venv because
# anomalib pins its own dependency tree (lightning, timm, openvino...) that mrkd's does not need.
# Usage: scripts/setup_anomalib_venv.sh [VENV_DIR]    (default /work/anomalib-venv; the bench reads
# MRKD_ANOMALIB_PYTHON, else VENV_DIR/bin/python). Delete the folder when done measuring (~6.6 GB).
set -euo pipefail
venv="${1:-/work/anomalib-venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
# The same torch build as mrkd's environment (setup_env.sh), so both sides run the same CPU kernels; the
# constraints keep anomalib's resolver (lightning, timm, torchmetrics ask for plain `torch`) from moving it
# to another release, which pip would fetch from PyPI as a multi-GB CUDA build. On x86_64 the 2.14.1 wheel
# on this machine's disk is itself PyPI's +cu130 build (its nvidia-* libraries come from the disk too):
# it runs on the CPU here, as mrkd's .venv does. The venv is about 6.6 GB.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$constraints"
"$venv/bin/python" -m pip install --quiet -c "$constraints" "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install --quiet -c "$constraints" "anomalib[openvino]==2.7.*" openvino onnx onnxscript onnxruntime
"$venv/bin/python" -c "import anomalib, openvino, torch; print('anomalib', anomalib.__version__, 'openvino', openvino.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
