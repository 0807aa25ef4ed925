#!/usr/bin/env bash
# Unpacks the Triton releases GPU users run into .cache/triton/VERSION, for compiling the kernels
# for real NVIDIA targets on this machine (keepkv_vllm/kernels/cross_compile_harness.py). vLLM's
# CUDA wheel pins torch and torch pins Triton, so the Triton a GPU user has is not this venv's:
#   3.7.1  vLLM 0.32        -> torch 2.13.0 -> triton 3.7.1
#   3.8.0  vLLM 0.33, 0.34  -> torch 2.14.0 -> triton 3.8.0
# Each wheel (manylinux x86_64, this machine's CPython) carries its own ptxas, ptxas-blackwell and
# cuobjdump. Idempotent: a version whose folder has the .complete marker is skipped.
# Usage: bash scripts/fetch-triton-wheels.sh [VERSION...]   (default: the list below)
# KEEPKV_TRITON_DIR overrides the destination (default .cache/triton).
set -euo pipefail
VERSIONS=(3.7.1 3.8.0)
cd "$(dirname "$0")/.."
PY=${KEEPKV_VENV:-.venv}/bin/python
DEST=${KEEPKV_TRITON_DIR:-.cache/triton}
(($#)) && VERSIONS=("$@")
for version in "${VERSIONS[@]}"; do
  dir=$DEST/$version
  if [[ -f $dir/.complete ]]; then
    echo "triton $version: $dir (already unpacked)"
    continue
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  start=$SECONDS
  # --only-binary: the manylinux wheel for this interpreter; --no-deps: Triton alone, no torch
  "$PY" -m pip download -q --no-deps --only-binary=:all: "triton==$version" -d "$tmp"
  wheel=$(ls "$tmp"/triton-"$version"-*.whl)
  fetched=$((SECONDS - start))
  rm -rf "$dir" && mkdir -p "$dir"
  unzip -q "$wheel" -d "$dir"  # unzip keeps the executable bits of ptxas/cuobjdump
  chmod +x "$dir"/triton/backends/nvidia/bin/*
  touch "$dir/.complete"
  echo "triton $version: $dir ($(basename "$wheel"), $(du -m "$wheel" | cut -f1) MB wheel," \
    "$(du -sm "$dir" | cut -f1) MB unpacked, ${fetched}s download, $((SECONDS - start))s in all)"
  rm -rf "$tmp"
  trap - EXIT
done
