#!/usr/bin/env bash
# moec beside llama.cpp on the same GGUF bytes, alternated within one run
# (outside `make check`; the machines are shared, so only ratios count):
#   - engine: llama-bench (pp and tg, 1 and 2 threads) and moec's
#     engine_throughput on the GGUF file `moec export` wrote (Q4_0, Q8_0),
#     for the two fixtures and synthetic OLMoE- and Qwen3-30B-A3B-shaped
#     models cut to a few layers;
#   - kernels: ggml's test-backend-ops MUL_MAT GEMV rates (one thread) and
#     bench/quant_kernels at 4096 x 14336, with this run's read bandwidth.
# llama.cpp is built once from the PyPI llama-cpp-python sdist
# (bench/build_llamacpp.sh). One JSON object per line, then a summary.
#   bench/vs_llamacpp.sh BUILD_DIR [OUT.jsonl]
# Environment: ROUNDS (3), MODELS ("tiny-mixtral tiny-deepseek olmoe qwen3"),
# TYPES ("q4_0 q8_0"), WORK (~/.cache/moec-vs-llamacpp: synthetic models),
# KERNELS (yes; "no" skips the GEMV pair), RUN (a label put in every line).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
build="$(cd "${1:?usage: bench/vs_llamacpp.sh BUILD_DIR [OUT.jsonl]}" && pwd)"
out="${2:-$here/results/vs_llamacpp.jsonl}"
bin="$(bash "$here/build_llamacpp.sh")"
exec python3 "$here/vs_llamacpp.py" "$build" "$bin" "$out"
