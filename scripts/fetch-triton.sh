#!/usr/bin/env bash
# Unpacks the Triton releases GPU users run (vLLM's CUDA wheel pins torch, torch pins Triton;
# the list is keepkv_vllm/kernels/cross_compile.py's GPU_TRITON) into .cache/triton/VERSION,
# where tests/test_kernel_compile.py compiles every served kernel variant for sm_80/90/100 with
# them. Each wheel carries its own ptxas and cuobjdump. Idempotent. Usage: bash scripts/fetch-triton.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KEEPKV_VENV:-.venv}
PY="$VENV/bin/python"
versions=$("$PY" -c 'from keepkv_vllm.kernels.cross_compile import GPU_TRITON; print(*GPU_TRITON)')
for version in $versions; do
  dest=.cache/triton/$version
  [[ -f $dest/.complete ]] && continue
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --only-binary=:all: "triton==$version" -d "$tmp"
  rm -rf "$dest" && mkdir -p "$dest"
  "$PY" -m zipfile -e "$tmp"/triton-*.whl "$dest"
  chmod +x "$dest"/triton/backends/nvidia/bin/*  # zipfile drops the executable bits
  rm -rf "$tmp"
  touch "$dest/.complete"
  echo "triton $version -> $dest"
done
