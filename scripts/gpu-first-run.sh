#!/usr/bin/env bash
# The first thing to run on a GPU machine (torch + triton; no vLLM, no network, < 8 minutes on
# one H100/H200): import hygiene, every served kernel variant compiled and checked against
# torch, the 64-bit addressing probe, host syncs of a compression order counted by CUDA, and
# the decode benchmark against torch's SDPA. Writes OUT_DIR/gpu-first-run.json (and gpu-check.json).
#   bash scripts/gpu-first-run.sh OUT_DIR [--smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu-first-run.sh OUT_DIR [--smoke]}
shift
PY=${PYTHON:-python3}
unset TRITON_INTERPRET
# the package is pure Python besides its kernels: run it from the checkout, no install
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m keepkv_vllm.kernels.gpu_first_run "$out" "$@"
