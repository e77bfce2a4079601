#!/usr/bin/env bash
# The checks `make image` and `make study` run before anything slow, each failing with one line on
# stderr and exit status 2:
#   image: a Docker (or Podman) daemon answers; requirements.lock matches its inputs.
#   study: the same, STUDY is a file under studies/ (the image holds only that folder), and when GPUS
#          is set, the NVIDIA container runtime answers with a driver new enough for CUDA 13.0.
# Environment: DOCKER, GPUS, STUDY, PYTHON, TORCH, LOCK_FLAGS (from the Makefile).
set -uo pipefail
what=${1:-study}
DOCKER=${DOCKER:-docker}
# torch 2.13.0's CUDA 13.0 build needs the R580 driver branch (see docs/docker.md).
MIN_DRIVER=580.65.06

fail() { echo "make $what: $*" >&2; exit 2; }

command -v "${DOCKER%% *}" >/dev/null 2>&1 || fail "'$DOCKER' is not installed: install Docker Engine (or set DOCKER=podman)"
$DOCKER info >/dev/null 2>&1 || fail "no Docker daemon answers ('$DOCKER info' failed): start it (systemctl start docker) or check your access to its socket"
"${PYTHON:-python3}" docker/lock.py check requirements.lock "${TORCH:-}" "${LOCK_FLAGS:-}" 2>&1 >/dev/null \
  | head -n1 | grep . >&2 && exit 2

[ "$what" = study ] || exit 0

study=${STUDY:-}
case "$study" in
  studies/*) ;;
  *) fail "STUDY=$study is not under studies/ (the image holds only that folder): copy it there" ;;
esac
case "$study" in *..*) fail "STUDY=$study leaves studies/ ('..'): copy the file into studies/" ;; esac
[ -f "$study" ] || fail "STUDY=$study: no such file"

[ -n "${GPUS:-}" ] || exit 0
need="install the NVIDIA driver >= $MIN_DRIVER (CUDA 13.0) and nvidia-container-toolkit, then restart Docker; or run on the CPU with GPUS="
runtimes=$($DOCKER info --format '{{json .Runtimes}}' 2>/dev/null)
if ! command -v nvidia-container-cli >/dev/null 2>&1 && [[ "$runtimes" != *nvidia* ]]; then
  fail "GPUS=$GPUS but no NVIDIA container runtime is installed: $need"
fi
if command -v nvidia-container-cli >/dev/null 2>&1; then
  info=$(nvidia-container-cli info 2>&1) || fail "GPUS=$GPUS but the NVIDIA container runtime finds no GPU driver ($(echo "$info" | head -n1)): $need"
  driver=$(echo "$info" | sed -n 's/^NVRM version: *//p' | head -n1)
  if [ -n "$driver" ] && [ "$(printf '%s\n%s\n' "$MIN_DRIVER" "$driver" | sort -V | head -n1)" != "$MIN_DRIVER" ]; then
    fail "GPUS=$GPUS but the NVIDIA driver is $driver; torch's CUDA 13.0 build needs >= $MIN_DRIVER: update the driver or run on the CPU with GPUS="
  fi
fi
exit 0
