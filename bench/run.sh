#!/usr/bin/env bash
# Runs the benchmarks and prints their JSON. Usage: bench/run.sh BUILD_DIR
# Generated checkpoints go to ${MOEC_BENCH_DIR:-/tmp/moec-bench} (about 3 GiB).
set -euo pipefail
build=${1:-build}
dir=${MOEC_BENCH_DIR:-/tmp/moec-bench}
for dtype in BF16 F16 F8_E4M3; do
  if [ ! -f "$dir/$dtype/model.safetensors.index.json" ]; then
    "$build/bench/checkpoint_read" --generate "$dir/$dtype" --dtype "$dtype" --mib 1024
  fi
  for threads in 1 2; do
    "$build/bench/checkpoint_read" "$dir/$dtype" --threads "$threads" --repeat 3
  done
done
