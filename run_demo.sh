#!/usr/bin/env bash
# Set up everything and run the main job on the embedded data set: generate, train, evaluate,
# export to ONNX (and TensorRT when present), stream a video through the exported model.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_env.sh train,lite,plc
exec .venv/bin/mrkd demo "$@"
