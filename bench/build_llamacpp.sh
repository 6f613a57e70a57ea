#!/usr/bin/env bash
# Builds llama.cpp's perplexity, quantize, imatrix, bench and test-backend-ops
# tools from the
# PyPI llama-cpp-python source distribution (it vendors llama.cpp), once,
# into a cache; prints the directory of the binaries. Outside `make check`.
#   bench/build_llamacpp.sh [CACHE_DIR]   (default: ~/.cache/moec-llamacpp)
set -euo pipefail
cache="${1:-${HOME}/.cache/moec-llamacpp}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
bin="$cache/build-$version/bin"
if [ -x "$bin/llama-perplexity" ] && [ -x "$bin/llama-quantize" ] && [ -x "$bin/llama-imatrix" ] &&
   [ -x "$bin/llama-bench" ] && [ -x "$bin/test-backend-ops" ]; then
  echo "$bin"
  exit 0
fi
mkdir -p "$cache"
if [ ! -d "$cache/llama_cpp_python-$version" ]; then
  python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$cache" >&2
  tar -xzf "$cache/llama_cpp_python-$version.tar.gz" -C "$cache"
fi
cmake -S "$cache/llama_cpp_python-$version/vendor/llama.cpp" -B "$cache/build-$version" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=ON -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$cache/build-$version" -j "$(nproc)" \
  --target llama-perplexity llama-quantize llama-imatrix llama-bench test-backend-ops >&2
echo "$bin"
