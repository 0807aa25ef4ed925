#!/usr/bin/env bash
# CI: the plugin against vLLM releases this machine does not run (the CUDA wheels on PyPI).
#
#   bash scripts/check-vllm-release.sh           # the newest vLLM on PyPI, and the newest inside
#                                                # the tested range (keepkv_vllm/vllm_version.py)
#   bash scripts/check-vllm-release.sh 0.33.0    # just these releases
#
# For each release: download its wheel without dependencies, unpack only its Python files (and
# its METADATA) into .cache/vllm-release/VERSION, and with those first on PYTHONPATH run, each in
# a fresh process, the contract tests (tests/test_vllm_contract.py, tests/test_gpu_contract.py,
# tests/test_ray_contract.py) and an import of every keepkv_vllm module. VLLM_TARGET_DEVICE=cpu:
# the unpacked METADATA names the CUDA build ("0.33.0", no "+cpu"), so vLLM would find no
# platform on this GPU-less machine; its missing _C extension only warns.
# KEEPKV_ALLOW_UNTESTED_VLLM is unset.
#
# A failure against a release inside the tested range fails CI. A newest release outside it that
# fails is reported (which checks failed; the plugin refuses it at startup) without failing CI:
# a new vLLM shows up here before users meet it. PyPI unreachable: said, and CI goes on.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KEEPKV_VENV:-.venv}
PY="$VENV/bin/python"
CACHE=${KEEPKV_VLLM_RELEASE_CACHE:-.cache/vllm-release}
TESTS=(tests/test_vllm_contract.py tests/test_gpu_contract.py tests/test_ray_contract.py)
unset KEEPKV_ALLOW_UNTESTED_VLLM
start=$SECONDS
mkdir -p "$CACHE"

status=0
skip() {  # PyPI unreachable or unusable: say so; only a release already found failing fails CI
  echo "vllm release check: SKIPPED, PyPI did not answer ($1)"
  [[ -n ${2:-} ]] && tail -n 3 "$2" | sed 's/^/  /'
  exit "$status"
}

range=$("$PY" -c 'from keepkv_vllm.vllm_version import TESTED_RANGE; print(TESTED_RANGE)')
if (( $# )); then
  targets=("$@")
else
  if ! "$PY" -m pip index versions vllm > "$CACHE/index.txt" 2> "$CACHE/index.err"; then
    skip "pip index versions vllm" "$CACHE/index.err"
  fi
  # the newest final release, then the newest one inside the tested range if that is another
  newest=$("$PY" - "$CACHE/index.txt" << 'PY'
import re, sys
from packaging.version import Version
from keepkv_vllm.vllm_version import is_tested
listed = re.search(r"Available versions: (.*)", open(sys.argv[1]).read())
versions = [v.strip() for v in listed.group(1).split(",")] if listed else []
final = sorted((v for v in versions if not Version(v).is_prerelease), key=Version, reverse=True)
tested = [v for v in final if is_tested(v)]
for v in dict.fromkeys(final[:1] + tested[:1]):
    print(v)
PY
  )
  mapfile -t targets <<< "$newest"
  [[ -n $newest ]] || skip "no vllm release listed" "$CACHE/index.txt"
fi

unpack() {  # VERSION -> its Python files under $CACHE/VERSION (once)
  local version=$1 dest="$CACHE/$1"
  [[ -f $dest/.unpacked ]] && return 0
  local wheels="$CACHE/wheels"
  if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: "vllm==$version" -d "$wheels" \
    > "$CACHE/download.log" 2>&1; then
    return 1
  fi
  rm -rf "$dest.tmp"
  "$PY" - "$wheels" "$version" "$dest.tmp" << 'PY'
import sys, zipfile
from pathlib import Path
wheels, version, dest = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
wheel = next(wheels.glob(f"vllm-{version}-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    names = [n for n in archive.namelist() if n.startswith("vllm/") and n.endswith(".py")]
    names += [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    archive.extractall(dest, members=names)
wheel.unlink()  # hundreds of MB; the Python files are all the checks need
print(f"vllm {version}: {len(names)} files unpacked from {wheel.name}")
PY
  rm -rf "$dest"
  mv "$dest.tmp" "$dest"
  touch "$dest/.unpacked"
}

check() {  # VERSION -> 0 if every check passes; the log in $CACHE/VERSION.log
  local src log
  src=$(cd "$CACHE/$1" && pwd)
  log="$CACHE/$1.log"
  local rc=0
  PYTHONPATH="$src" VLLM_TARGET_DEVICE=cpu "$PY" -m pytest -q -p no:xdist -p no:cacheprovider \
    -o addopts= -rfE --timeout=600 --continue-on-collection-errors "${TESTS[@]}" > "$log" 2>&1 || rc=$?
  PYTHONPATH="$src" VLLM_TARGET_DEVICE=cpu "$PY" - "$src" >> "$log" 2>&1 << 'PY' || rc=$((rc ? rc : 1))
import importlib, pkgutil, sys
import vllm
import keepkv_vllm
from keepkv_vllm.config import ConfigError
from keepkv_vllm.vllm_version import check_vllm_version, installed_vllm
assert vllm.__file__.startswith(sys.argv[1]), f"vllm came from {vllm.__file__}, not {sys.argv[1]}"
failed = []
def record(name):
    failed.append(f"{name}: {sys.exc_info()[0].__name__}: {sys.exc_info()[1]}")
for module in pkgutil.walk_packages(keepkv_vllm.__path__, "keepkv_vllm.", onerror=record):
    try:
        importlib.import_module(module.name)
    except Exception:
        record(module.name)
print(f"IMPORT vllm {vllm.__version__} ({vllm.__file__}): {len(failed)} keepkv_vllm module(s) failed to import")
for line in failed:
    print(f"IMPORT FAILED {line}")
try:
    check_vllm_version()
    print(f"STARTUP vLLM {installed_vllm()} is inside the tested range: the plugin starts")
except ConfigError as e:
    print(f"STARTUP refused: {e}")
sys.exit(1 if failed else 0)
PY
  return "$rc"
}

for version in "${targets[@]}"; do
  t0=$SECONDS
  if ! unpack "$version"; then
    skip "pip download vllm==$version" "$CACHE/download.log"
  fi
  tested=$("$PY" -c 'import sys; from keepkv_vllm.vllm_version import is_tested; print(int(is_tested(sys.argv[1])))' "$version")
  label=$([[ $tested == 1 ]] && echo inside || echo outside)
  log="$CACHE/$version.log"
  if check "$version"; then
    echo "vllm $version ($label the tested range $range): ok, $(grep -E '^[0-9]+ passed' "$log" | tail -1), every module imports ($((SECONDS - t0)) s)"
    if [[ $tested == 0 ]]; then
      echo "  -> passes the contract checks: a candidate for widening the tested range (review it first)"
    fi
    continue
  fi
  summary=$(grep -E '^(FAILED|ERROR) |^IMPORT FAILED |^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)' "$log" \
    | sed -E 's/ - .*//' | cut -c1-200 | head -n 40 || true)
  causes=$(grep -E '^E +[A-Za-z.]*(Error|Failed)\b' "$log" | sed -E 's/^E +//' | cut -c1-200 | sort -u | head -n 15 || true)
  startup=$(grep -E '^STARTUP ' "$log" | cut -c1-300 || true)
  if [[ $tested == 1 ]]; then
    status=1
    echo "vllm $version (inside the tested range $range): FAILED ($((SECONDS - t0)) s); log: $log"
    echo "$summary" | sed 's/^/  /'
    echo "$causes" | sed 's/^/  /'
  else
    cat << EOF
================ vLLM $version: newer than the tested range $range ================
Checks that fail against its sources ($((SECONDS - t0)) s; log: $log):
$(echo "$summary" | sed 's/^/  /')
Why:
$(echo "$causes" | sed 's/^/  /')
${startup:-STARTUP (no verdict)}
-> The plugin refuses vLLM $version at startup (KEEPKV_ALLOW_UNTESTED_VLLM=1 tries anyway, untested).
   Not a CI failure: supporting it is work to do (docs/gpu.md, "vLLM versions").
================================================================================
EOF
  fi
done
echo "vllm release check: ${targets[*]} in $((SECONDS - start)) s"
exit "$status"
