#!/usr/bin/env bash
# Installs what deltatune builds and tests with, only what is missing:
# a C compiler, CMake, pkg-config, OpenBLAS (OpenMP build), jansson, PCRE2 and utf8proc; Node.js and the
# pinned npm reference packages of tools/npm (the tests compare the tokenizer and the chat
# templates with them). Debian/Ubuntu through apt-get, macOS through Homebrew (BLAS there
# is Accelerate).
set -euo pipefail

debian_pkgs=(build-essential cmake pkg-config libopenblas-openmp-dev libjansson-dev libpcre2-dev libutf8proc-dev)
brew_pkgs=(cmake pkg-config jansson libomp node pcre2 utf8proc)

here=$(cd "$(dirname "$0")/.." && pwd)
# The reference implementations, at the versions package-lock.json pins.
npm_refs() {
  [[ -d "$here/tools/npm/node_modules" ]] && return 0
  echo "install-deps: installing the npm reference packages (tools/npm)" >&2
  npm ci --prefix "$here/tools/npm" --no-audit --no-fund >/dev/null
}

if [[ "$(uname)" == "Darwin" ]]; then
  command -v brew >/dev/null || { echo "install-deps: Homebrew is required on macOS" >&2; exit 1; }
  for p in "${brew_pkgs[@]}"; do brew list "$p" >/dev/null 2>&1 || brew install "$p"; done
  npm_refs
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
# Node.js by command, not by package: a machine may have a newer one than Debian's.
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "install-deps: installing ${missing[*]}" >&2
  SUDO=""
  [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
npm_refs
