#!/usr/bin/env bash
# Runs the benchmarks and prints their JSON.
# Usage: bench/run.sh BUILD_DIR [checkpoint|engine|experts|kernels|packages|quantization|gptq-memory|naee|cuda|vs-llamacpp]
# (vs-llamacpp, about 30 minutes, runs only when named.)
# Generated checkpoints go to ${MOEC_BENCH_DIR:-/tmp/moec-bench} (about 7 GiB).
set -euo pipefail
build=${1:-build}
which=${2:-all}
dir=${MOEC_BENCH_DIR:-/tmp/moec-bench}
here=$(cd "$(dirname "$0")" && pwd)

if [ "$which" = all ] || [ "$which" = checkpoint ]; then
  for dtype in BF16 F16 F8_E4M3; do
    if [ ! -f "$dir/$dtype/model.safetensors.index.json" ]; then
      "$build/bench/checkpoint_read" --generate "$dir/$dtype" --dtype "$dtype" --mib 1024
    fi
    for threads in 1 2; do
      "$build/bench/checkpoint_read" "$dir/$dtype" --threads "$threads" --repeat 3
    done
  done
fi

if [ "$which" = all ] || [ "$which" = engine ]; then
  for fixture in tiny-mixtral tiny-deepseek; do
    "$build/bench/engine_throughput" "$here/../tests/data/fixtures/$fixture" --prompt 256 --decode 64
  done
  olmoe="$dir/olmoe-1b-7b-4layers"
  if [ ! -f "$olmoe/model.safetensors.index.json" ]; then
    "$build/tools/moec-synth" --config "$here/configs/olmoe-1b-7b-4layers.json" --shards 8 -o "$olmoe"
  fi
  "$build/bench/engine_throughput" "$olmoe" --prompt 256 --decode 32
  # The same model with a budget of one layer: weights streamed layer by layer.
  "$build/bench/engine_throughput" "$olmoe" --prompt 256 --decode 8 --max-memory 1
fi

if [ "$which" = all ] || [ "$which" = experts ]; then
  python3 "$here/expert_quality.py" "$build"
fi

if [ "$which" = all ] || [ "$which" = kernels ]; then
  "$build/bench/quant_kernels" --rows 32768 --cols 8192 --repeat 3
fi

if [ "$which" = all ] || [ "$which" = packages ]; then
  python3 "$here/package_quality.py" "$build"
fi

if [ "$which" = all ] || [ "$which" = quantization ]; then
  python3 "$here/quant_quality.py" "$build"
fi

# NAEE's subset search on 16 experts per layer: one subset scored by
# recomputing the block vs from expert-output products, then the whole pass
# (moe-opt, every subset) at 25% and 50%.
if [ "$which" = all ] || [ "$which" = naee ]; then
  m16="$dir/mixtral-16experts-4layers"
  if [ ! -f "$m16/model.safetensors" ]; then
    "$build/tools/moec-synth" --config "$here/configs/mixtral-16experts-4layers.json" -o "$m16"
  fi
  python3 -c "import random, struct, sys; random.seed(1); sys.stdout.buffer.write(struct.pack('<8192I', *[random.randrange(1024) for _ in range(8192)]))" >"$dir/random-8192.u32"
  "$build/bench/naee_search" "$m16" "$dir/random-8192.u32" --samples 2048
  "$build/tools/moec" import "$m16" -o "$dir/m16.mlir" --quiet
  "$build/tools/moec" calibrate "$m16" --data "$dir/random-8192.u32" --block-samples 2048 -o "$dir/m16.stats.safetensors" --quiet
  for ratio in 0.25 0.5; do
    start=$(date +%s.%N)
    "$build/tools/moe-opt" "$dir/m16.mlir" --moe-prune-experts="stats=$dir/m16.stats.safetensors method=reconstruction ratio=$ratio" -o /dev/null
    python3 -c "import sys; print('{\"bench\": \"naee_pass\", \"ratio\": %s, \"seconds\": %.2f}' % (sys.argv[1], float(sys.argv[3]) - float(sys.argv[2])))" "$ratio" "$start" "$(date +%s.%N)"
  done
fi

# Sequential GPTQ's memory and time at OLMoE-1B-7B layer shapes (~15 min).
if [ "$which" = all ] || [ "$which" = gptq-memory ]; then
  olmoe="$dir/olmoe-1b-7b-4layers"
  if [ ! -f "$olmoe/model.safetensors.index.json" ]; then
    "$build/tools/moec-synth" --config "$here/configs/olmoe-1b-7b-4layers.json" --shards 8 -o "$olmoe"
  fi
  python3 "$here/gptq_memory.py" "$build" "$olmoe" 2048
fi

# The CUDA GEMV (needs a GPU; skipped without one).
if [ "$which" = all ] || [ "$which" = cuda ]; then
  if [ -x "$build/bench/cuda_gemv" ] && nvidia-smi > /dev/null 2>&1; then
    for shape in "32768 8192" "4096 14336" "14336 4096" "1024 2048"; do
      set -- $shape
      "$build/bench/cuda_gemv" --rows "$1" --cols "$2" --repeat 100
    done
  else
    echo '{"cuda_gemv": "skipped: no GPU or no CUDA build"}'
  fi
fi

if [ "$which" = vs-llamacpp ]; then
  bash "$here/vs_llamacpp.sh" "$build"
fi
