#!/usr/bin/env bash
# The project's test command (README, CI): lint, then the whole pytest suite, slow
# end-to-end tests included. Extra arguments go to pytest, e.g. -m "not slow" for a quick loop.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KEEPKV_VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
exec "$VENV/bin/python" -m pytest "$@"
