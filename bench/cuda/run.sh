#!/usr/bin/env bash
# Runs on the GPU machine: `bench local` and `bench swarm` on `--device cuda`
# with the binary from bench/cuda/build.sh and the default model, both
# carried there (in pieces if a transfer limit asks: `split` them, and this
# joins `MODEL.part*`). Writes each table as text and JSON into OUT_DIR.
#
# Usage: bench/cuda/run.sh BINARY.xz MODEL.gguf [OUT_DIR]
set -euo pipefail
bin_xz=$1
model=$2
out=${3:-${OUT:-bench-cuda}}
mkdir -p "$out"
if [ ! -f "$model" ]; then
  cat "$model".part* >"$model"
fi
work=$(mktemp -d)
xz -dc "$bin_xz" >"$work/hypertensor"
chmod +x "$work/hypertensor"
# The binary links CUDA 13's runtime, cuBLAS and cuRAND; the driver brings libcuda.
for lib in libcublas.so.13 libcurand.so.10 libcudart.so.13; do
  dir=$(dirname "$(find / -name "$lib" -not -path '/proc/*' 2>/dev/null | head -1)")
  export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
nvidia-smi -L
"$work/hypertensor" bench local --model "$model" --device cuda \
  --json "$out/local-cuda.json" 2>&1 | tee "$out/local-cuda.txt"
"$work/hypertensor" bench swarm --model "$model" --device cuda \
  --json "$out/swarm-cuda.json" 2>&1 | tee "$out/swarm-cuda.txt"
