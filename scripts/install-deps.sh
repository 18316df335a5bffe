#!/usr/bin/env bash
# Installs what deltatune builds and tests with, only what is missing:
# a C compiler, CMake, pkg-config, OpenBLAS (OpenMP build) and jansson.
# Debian/Ubuntu through apt-get, macOS through Homebrew (BLAS there is Accelerate).
set -euo pipefail

debian_pkgs=(build-essential cmake pkg-config libopenblas-openmp-dev libjansson-dev)
brew_pkgs=(cmake pkg-config jansson libomp)

if [[ "$(uname)" == "Darwin" ]]; then
  command -v brew >/dev/null || { echo "install-deps: Homebrew is required on macOS" >&2; exit 1; }
  for p in "${brew_pkgs[@]}"; do brew list "$p" >/dev/null 2>&1 || brew install "$p"; done
  exit 0
fi

if ! command -v dpkg-query >/dev/null; then
  echo "install-deps: not a Debian/Ubuntu system; install: ${debian_pkgs[*]}" >&2
  exit 1
fi

missing=()
for p in "${debian_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
