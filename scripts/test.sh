#!/usr/bin/env bash
# The project's test command (README, CI): lint, then the whole pytest suite, slow
# end-to-end tests included. Extra arguments go to pytest, e.g. -m "not slow" for a quick loop.
#
# Test files run side by side on pytest-xdist workers, each file whole on one worker (its
# module-scoped servers stay shared). vLLM's CPU engine computes on one thread per core it is
# bound to, and on a 2-core machine its default binding leaves the second core to the
# scheduler, mostly idle; tests/conftest.py gives each worker its own slice of the CPUs, so two
# workers use both. KEEPKV_TEST_WORKERS=1 runs everything in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KEEPKV_VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# the Triton releases GPU users run, for tests/test_kernel_compile.py (idempotent: once per checkout)
bash scripts/fetch-triton.sh
cpus=$(nproc)
workers=${KEEPKV_TEST_WORKERS:-$(( cpus >= 4 ? 4 : cpus ))}
parallel=()
if (( workers > 1 )); then parallel=(-n "$workers" --dist loadfile); fi
exec "$VENV/bin/python" -m pytest "${parallel[@]}" "$@"
