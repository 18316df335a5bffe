#!/usr/bin/env bash
# Builds one group of the CUDA op tests alone, without CMake or the text libraries:
#   tests/cuda/quick.sh OUT_BINARY TEST_FILE.c CUDA_FILE.cu ...
# test_cuda.c, runtime.cu and the CPU ops are always linked in. Compiles anywhere
# nvcc is; the binary runs on the GPU machine (`OUT_BINARY GROUP`).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$1; shift
tmp=$(mktemp -d)
blas_inc=$(dirname "$(ls /usr/include/x86_64-linux-gnu/openblas*/cblas.h /usr/include/openblas/cblas.h /usr/include/cblas.h 2>/dev/null | head -1)")
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
objs=()
for f in tests/cuda/test_cuda.c src/ops/*.c src/base/error.c src/base/dtype.c src/base/quant.c src/base/mem.c "$@" src/cuda/runtime.cu; do
  [ -f "$f" ] || continue
  case " ${objs[*]-} " in *" $tmp/$(echo "$f" | tr / _).o "*) continue;; esac
  o=$tmp/$(echo "$f" | tr / _).o
  case $f in
    *.c)  gcc -O2 -std=gnu11 -fopenmp -Iinclude -Isrc -Itests/cuda -I"$blas_inc" -c "$f" -o "$o" ;;
    *.cu) "$NVCC" -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Iinclude -Isrc -c "$f" -o "$o" ;;
  esac
  objs+=("$o")
done
"$NVCC" -o "$out" "${objs[@]}" -lcublas -lopenblas -lgomp -lm
rm -rf "$tmp"
