#!/usr/bin/env bash
# Builds deltatune on the GPU machine, which cannot install packages: the Debian packages that
# it lacks (jansson, PCRE2, utf8proc headers and libraries) travel in .deps/ and are unpacked
# into a private root, never into /. Its OpenBLAS, OpenMP and CUDA are used as they are.
#   here:   mkdir -p .deps && (cd .deps && apt-get download libjansson-dev libjansson4 libpcre2-dev \
#               libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3 libutf8proc2 libutf8proc-dev)
#   there:  scripts/device-build.sh [build-dir]     (run with carry: [".deps"])
# Afterwards: export LD_LIBRARY_PATH=/tmp/dt-deps/usr/lib/x86_64-linux-gnu (printed at the end).
set -euo pipefail
build=${1:-build-device}
root=/tmp/dt-deps
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$root"
for f in "$here"/.deps/*.deb; do dpkg -x "$f" "$root"; done
export PKG_CONFIG_SYSROOT_DIR=$root
export PKG_CONFIG_PATH=$root/usr/lib/x86_64-linux-gnu/pkgconfig:$root/usr/share/pkgconfig
export LD_LIBRARY_PATH=$root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$(nproc)"
echo "export LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
