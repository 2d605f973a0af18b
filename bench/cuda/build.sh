#!/usr/bin/env bash
# Builds `hypertensor` with `--features cuda` on a machine without a CUDA
# toolkit or GPU (the GPU machines this project borrows have no Rust, and
# nothing can be fetched there): CUDA 13's compiler, headers and libraries
# come from NVIDIA's wheels on PyPI, and the driver library, which only a
# GPU machine has, is replaced at link time by a stub with the same soname
# and symbols. Writes the stripped binary, xz-compressed, to OUT.
#
# Usage: bench/cuda/build.sh [OUT]   (default target-cuda/hypertensor.xz)
# Env:   CUDA_COMPUTE_CAP (default 90: H100/H200), HYPERTENSOR_CACHE.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target-cuda/hypertensor.xz}
cache="${HYPERTENSOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hypertensor}/cuda-13.0"
home="$cache/root/nvidia/cu13"

if [ ! -x "$home/nvvm/bin/cicc" ]; then
  echo "== CUDA 13.0 toolkit from PyPI wheels into $cache"
  mkdir -p "$cache/wheels" "$cache/root"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$cache/wheels" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
    "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*"
  for w in "$cache"/wheels/*.whl; do unzip -q -o "$w" -d "$cache/root"; done
  # The libraries under the names the linker looks for.
  for l in libcublas libcublasLt libcudart libnvrtc; do ln -sf "$l.so.13" "$home/lib/$l.so"; done
  ln -sf libcurand.so.10 "$home/lib/libcurand.so"
  # libcuda comes with the driver: link against a stub that defines every
  # function cuda.h declares (under their versioned names), with the real
  # library's soname, so the binary loads the driver's libcuda.so.1 there.
  gcc -E -I"$home/include" "$home/include/cuda.h" |
    grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | sed 's/\s*($//' | sort -u |
    awk '{print "void " $1 "(void) {}"}' >"$cache/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/libcuda.so" "$cache/cuda_stub.c"
fi

echo "== cargo build --release --features cuda (CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90})"
export CUDA_HOME="$home" CUDA_PATH="$home" CUDA_ROOT="$home"
export PATH="$home/bin:$PATH" LIBRARY_PATH="$home/lib" LD_LIBRARY_PATH="$home/lib"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
cargo build --release --locked -p cli --bin hypertensor --features cuda
mkdir -p "$(dirname "$out")"
strip -o "${out%.xz}" "${CARGO_TARGET_DIR:-target}/release/hypertensor"
xz -T0 -6 -f "${out%.xz}"
echo "wrote $out ($(du -h "$out" | cut -f1))"
