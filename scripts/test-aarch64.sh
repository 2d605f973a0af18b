#!/usr/bin/env bash
# AArch64 check of the quantized kernels from an x86-64 Debian machine: cross
# builds the `model` crate, lints it for aarch64, and runs its `quant` tests
# (every kernel the CPU supports against the scalar reference) under
# qemu-user. The other tests need the model files and are left to real Arm
# machines.
#
# qemu's default CPU ("max") has the dot product extension, so those tests
# cover `neon` and `neon-dotprod` alike; a second run as a Cortex-A53 (no
# dotprod) checks that `neon-dotprod` is then left out and `neon` stands alone.
#
# Installs the cross compiler, an arm64 libc and qemu-user with apt (as root,
# or through sudo) when missing, and rustup's aarch64 standard library.
# Usage: scripts/test-aarch64.sh   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."

# Build outputs may be cached outside the clone between runs, as .ci/run does.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/.ci-target}"
export CARGO_TERM_COLOR=never
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

target=aarch64-unknown-linux-gnu
sysroot=/usr/aarch64-linux-gnu

need() { command -v "$1" >/dev/null 2>&1; }
if ! need aarch64-linux-gnu-gcc || ! need qemu-aarch64 || [ ! -e "$sysroot/lib/libc.so.6" ]; then
  as_root=()
  if [ "$(id -u)" -ne 0 ]; then
    need sudo || { echo "installing the cross toolchain needs root (or sudo)" >&2; exit 1; }
    as_root=(sudo)
  fi
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
fi
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi
rustup component add clippy >/dev/null 2>&1 || true

# Link with the cross gcc; C dependencies (onig, for the tokenizer) build with
# it too; test binaries run under qemu with the arm64 libc.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $sysroot"

echo "== cargo clippy (aarch64)"
cargo clippy -p model --lib --tests --target "$target" --locked -- -D warnings

echo "== quant tests under qemu (default CPU: NEON and dotprod)"
cargo test -p model --lib --target "$target" --locked quant::

echo "== quant tests under qemu (Cortex-A53: NEON without dotprod)"
QEMU_CPU=cortex-a53 cargo test -p model --lib --target "$target" --locked quant::
