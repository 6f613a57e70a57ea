#!/usr/bin/env bash
# Installs every Debian package that building, testing and the tools of moec need.
# Idempotent and non-interactive: when everything is present it prints nothing and
# touches no package index. Runs as root (CI) or through sudo when available.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config python3 python3-pip
  # compiler infrastructure: MLIR/LLVM 19 (shared libMLIR.so, lit, FileCheck)
  llvm-19-dev llvm-19-tools libmlir-19-dev mlir-19-tools
  # clang with its sanitizer and libFuzzer runtimes (make check-asan, make fuzz)
  clang-19 libclang-rt-19-dev
  # libraries
  libcli11-dev nlohmann-json3-dev libgtest-dev libgmock-dev
  libopenblas-dev libeigen3-dev libpcre2-dev libutf8proc-dev libglpk-dev libxxhash-dev libyaml-cpp-dev
  # Open MPI: distributed moec compress (mpirun -n N; its tests skip without it)
  libopenmpi-dev openmpi-bin
  # headless browser: the test that renders moec's HTML report (skips without it)
  chromium
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup.sh: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "setup.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Python's safetensors and numpy (PyPI; Debian 12 packages no safetensors):
# the independent check of moec's safetensors writer, which `make check` then
# requires (tests/CMakeLists.txt). Without PyPI the check is skipped, said so.
if ! python3 -c "import safetensors, numpy" 2>/dev/null; then
  pip=(python3 -m pip install --quiet --disable-pip-version-check safetensors numpy)
  "${pip[@]}" 2>/dev/null || "${pip[@]}" --break-system-packages 2>/dev/null ||
    echo "setup.sh: could not install safetensors and numpy from PyPI; the Python safetensors cross-check will skip" >&2
fi
