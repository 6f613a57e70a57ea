#!/usr/bin/env bash
# Installs every Debian package that building, testing and the tools of moec need.
# Idempotent and non-interactive: when everything is present it prints nothing and
# touches no package index. Runs as root (CI) or through sudo when available.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config python3
  # compiler infrastructure: MLIR/LLVM 19 (shared libMLIR.so, lit, FileCheck)
  llvm-19-dev llvm-19-tools libmlir-19-dev mlir-19-tools
  # clang with its sanitizer and libFuzzer runtimes (make check-asan, make fuzz)
  clang-19 libclang-rt-19-dev
  # libraries
  libcli11-dev nlohmann-json3-dev libgtest-dev libgmock-dev
  libopenblas-dev libeigen3-dev libpcre2-dev libutf8proc-dev libglpk-dev libxxhash-dev
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup.sh: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup.sh: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
