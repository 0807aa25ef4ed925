#!/usr/bin/env bash
# Serves the bundled SmolLM2-135M-Instruct through the real `vllm serve` (OpenAI API on
# :8000). Extra arguments go to `vllm serve` unchanged. On a CPU-only host it picks fp32
# (bf16 is ~4.5x slower on these CPUs) and a KV pool of 1 GiB; override with flags.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KEEPKV_VENV:-.venv}
MODEL=${KEEPKV_MODEL:-$("$VENV/bin/python" -c 'from keepkv_vllm.assets import model_dir; print(model_dir())')}
defaults=(--served-model-name smollm2)
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  defaults+=(--dtype float32 --max-model-len 8192 --kv-cache-memory-bytes 1073741824)
fi
exec "$VENV/bin/vllm" serve "$MODEL" "${defaults[@]}" "$@"
