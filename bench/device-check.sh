#!/usr/bin/env bash
# The GPU checks of moec in one run (about 8-12 minutes on an H100/H200;
# STEPS splits it):
# builds the CUDA code (or uses the binaries scripts/pack-device.sh packed
# into .device/device.tar.xz), runs the CUDA tests (kernels against the CPU's reference,
# engine parity on both fixtures and on a package per recipe of examples/,
# routing on the device against routing on the host), compute-sanitizer's
# memcheck over the kernel and fixture tests (memcheck, racecheck and
# synccheck over routing and prompts on the device), and bench/cuda_engine on
# real shapes. Logs and JSON
# go to OUT (default build-device/results); record the card, driver and
# numbers in BENCHMARKS.md.
#
#   bench/device-check.sh [OUT]
#
# STEPS (default "tests bench memcheck ncu") picks the steps of a shorter
# run; "quickbench" in place of "bench" runs the four 4-bit models and the
# comparisons beside them (Mixtral streamed, OLMoE a warp per row, with
# its MoE blocks' kernels apart and with a graph per layer, after 1024 tokens with and without split attention,
# with plain launches, with routing on the host and without graphs,
# prompts on the decode path, prefill on dp4a), most telling first;
# "bench" adds bf16, one host thread, Qwen3 with plain launches, with
# routing on the host and with its MoE kernels apart, and OLMoE streamed and Mixtral a warp per row alone.
# BUDGET (whole seconds since the start, default 540: one call of the device
# tool after the tests) bounds the benchmark runs only: those that would end
# past it are skipped and logged. The sanitizers and ncu are for calls of
# their own (STEPS=memcheck, STEPS=ncu); BUDGET=3600 for a full run.
set -uo pipefail
steps=" ${STEPS:-tests bench memcheck ncu} "
budget=${BUDGET:-540}
SECONDS=0
want() { [[ $steps == *" $1 "* ]]; }
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/build-device/results}
mkdir -p "$out"
log() { echo "== $*" | tee -a "$out/summary.txt"; }
[[ $budget =~ ^[0-9]+$ ]] || { log "BUDGET must be whole seconds, not '$budget'"; exit 2; }

if [ -f "$root/.device/device.tar.xz" ]; then
  stage=/tmp/moec-device
  rm -rf "$stage" && mkdir -p "$stage" && xz -dc "$root/.device/device.tar.xz" | tar -C "$stage" -xf -
  export LD_LIBRARY_PATH=$stage/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  tests=$stage/bin/moec-cuda-tests
  engine=$stage/bin/cuda_engine
  packages=$stage/packages
else
  build=$root/build-device
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DMOEC_ENABLE_CUDA=ON >"$out/configure.log" 2>&1 &&
    cmake --build "$build" -j"$(nproc)" --target moec moec-cuda-tests cuda_engine write-grouped-variant \
      >"$out/build.log" 2>&1 ||
    { log "build failed (see build.log)"; exit 1; }
  tests=$build/tests/moec-cuda-tests
  engine=$build/bench/cuda_engine
  packages=$build/device-packages
  mkdir -p "$packages"
  for fixture in tiny-mixtral tiny-deepseek; do
    for recipe in "$root"/examples/recipes/*.json; do
      "$build/tools/moec" compress "$root/tests/data/fixtures/$fixture" --recipe "$recipe" --quiet \
        -o "$packages/$fixture-$(basename "$recipe" .json).moepkg" >/dev/null
    done
  done
  # As scripts/pack-device.sh packs it: four query heads over one KV head.
  "$build/tests/write-grouped-variant" "$root/tests/data/hf/qwen3_moe" "$build/qwen3-gqa" 4 1 32 &&
    "$build/tools/moec" compress "$build/qwen3-gqa" --recipe "$root/tests/data/recipes/q4-g32-all.json" --quiet \
      -o "$packages/qwen3-gqa-q4-g32.moepkg" >/dev/null
fi

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
log "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"

export MOEC_TEST_DATA_DIR=$root/tests/data
if want tests; then
log "CUDA tests (packages: $(ls "$packages" | wc -l))"
MOEC_DEVICE_PACKAGES=$packages timeout 210 "$tests" >"$out/tests.log" 2>&1
status=$?
grep -E "^(device|parity)|PASSED|FAILED|SKIPPED" "$out/tests.log" | tee -a "$out/summary.txt"
log "tests exit $status"
fi

# Each run takes at most 60 s. Runs that would end past BUDGET seconds
# since the start (one call of the device tool allows 600) are skipped and
# logged, so the results are there when the call ends.
run_bench() { # name config layers format [more options]
  if ((SECONDS + 60 > budget)); then
    log "skipped (time: ${SECONDS} s of ${budget}): cuda_engine $1 $4 ${*:5}"
    return
  fi
  log "cuda_engine $1 $4 ${*:5}"
  timeout 60 "$engine" --config "$root/bench/configs/$2" --layers "$3" --format "$4" --device cuda \
    --prompt 512 --decode 64 --step 8 "${@:5}" >"$out/bench-$1-$4.json" 2>"$out/bench-$1-$4.err"
  log "exit $? $(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('decode %.0f tok/s (%.1f%% of copy bandwidth, %.1f%% with the KV cache of %.0f MB a token), 8-token steps %.0f tok/s, prefill %.0f tok/s (%s in device calls); %d layers routed on the device, graphs %d captured, %d replayed, %d failed; token graphs %d built, %d launched, %d failed' % (r['decode_tokens_per_second'], 100*r['decode_fraction_of_copy_bandwidth'], 100*r.get('decode_fraction_of_copy_bandwidth_with_cache', 0), r.get('decode_cache_bytes_per_step', 0)/1e6, r.get('step_tokens_per_second', 0), r['prefill_tokens_per_second'], ('%.0f%%' % (100*r['prefill_device_busy_fraction'])) if 'prefill_device_busy_fraction' in r else 'untimed', r.get('layers_routed_on_device', 0), r.get('graph_captures', 0), r.get('graph_replays', 0), r.get('graph_failures', 0), r.get('token_graphs', 0), r.get('token_graph_replays', 0), r.get('token_graph_failures', 0)))" "$out/bench-$1-$4.json" 2>&1 | tail -1)"
  tail -2 "$out/bench-$1-$4.err" >>"$out/summary.txt"
}
# Most telling first: what is left when the budget runs out is the least.
if want bench || want quickbench; then
run_bench olmoe-1b-7b olmoe-1b-7b-4layers.json 16 q4_g128_asym
run_bench qwen3-30b-a3b qwen3-30b-a3b-2layers.json 48 q4_g128_asym
run_bench deepseek-v2-lite deepseek-v2-lite.json 27 q4_g128_asym
run_bench mixtral-8x7b mixtral-8x7b.json 32 q4_g128_asym
# Mixtral's rows (2-7 KiB of codes) take a warp per row under auto: the
# streamed kernel beside it, what ProductKernel::Auto's threshold rests on.
run_bench mixtral-8x7b-streamed mixtral-8x7b.json 32 q4_g128_asym --product-kernel streamed
# And OLMoE's short rows, which auto streams, a warp per row.
run_bench olmoe-1b-7b-warp-per-row olmoe-1b-7b-4layers.json 16 q4_g128_asym --product-kernel warp-per-row
# Each MoE block's SwiGLU and weighted sum as kernels of their own (five
# a block), beside the default (three: both inside the products).
run_bench olmoe-1b-7b-moe-apart olmoe-1b-7b-4layers.json 16 q4_g128_asym --moe-kernels apart
# A graph per layer's attention and MLP, launched one by one, beside the
# default (the token's graphs as one).
run_bench olmoe-1b-7b-layer-graphs olmoe-1b-7b-4layers.json 16 q4_g128_asym --graphs layer
# Decode after 1024 tokens, attention split over blocks (the default) and
# a block a head: what the split gives where the KV cache is half the
# weights' bytes.
run_bench olmoe-1b-7b-context-1024 olmoe-1b-7b-4layers.json 16 q4_g128_asym --context 1024 --prompt 64 --decode 32 --step 1
run_bench olmoe-1b-7b-context-1024-one-block olmoe-1b-7b-4layers.json 16 q4_g128_asym --context 1024 --prompt 64 \
  --decode 32 --step 1 --attention-splits 1
# Each kernel after the last has ended, beside the default (programmatic
# dependent launches: a kernel's blocks start while the one before drains).
run_bench olmoe-1b-7b-plain-launches olmoe-1b-7b-4layers.json 16 q4_g128_asym --launches plain
# Routing on the host (a wait per layer), and on the device without the
# per-layer graphs, beside the default (on the device, graphs) above.
run_bench olmoe-1b-7b-host-routing olmoe-1b-7b-4layers.json 16 q4_g128_asym --routing host
run_bench olmoe-1b-7b-device-eager olmoe-1b-7b-4layers.json 16 q4_g128_asym --routing device-eager
# Prompts on the decode path (the residual stream on the device, chunks of
# 256 tokens), beside the default (products on the device, the rest on the
# host) above.
run_bench olmoe-1b-7b-prefill-device olmoe-1b-7b-4layers.json 16 q4_g128_asym --prefill device
run_bench mixtral-8x7b-prefill-device mixtral-8x7b.json 32 q4_g128_asym --prefill device
# Prefill's group-format products on dp4a rather than tensor cores
# (TensorTiles.h), beside the default above.
run_bench olmoe-1b-7b-dp4a olmoe-1b-7b-4layers.json 16 q4_g128_asym --product-kernel dp4a
run_bench mixtral-8x7b-dp4a mixtral-8x7b.json 32 q4_g128_asym --product-kernel dp4a
fi
if want bench; then
run_bench olmoe-1b-7b olmoe-1b-7b-4layers.json 16 bf16
# The host's share: the same with one CPU thread (no pool hand-offs).
run_bench olmoe-1b-7b-1thread olmoe-1b-7b-4layers.json 16 q4_g128_asym --threads 1
run_bench qwen3-30b-a3b-plain-launches qwen3-30b-a3b-2layers.json 48 q4_g128_asym --launches plain
run_bench qwen3-30b-a3b-host-routing qwen3-30b-a3b-2layers.json 48 q4_g128_asym --routing host
run_bench qwen3-30b-a3b-moe-apart qwen3-30b-a3b-2layers.json 48 q4_g128_asym --moe-kernels apart
# Each one-token kernel alone, beside the default (auto) above.
run_bench olmoe-1b-7b-streamed olmoe-1b-7b-4layers.json 16 q4_g128_asym --product-kernel streamed
run_bench mixtral-8x7b-warp-per-row mixtral-8x7b.json 32 q4_g128_asym --product-kernel warp-per-row
fi
if want memcheck && command -v compute-sanitizer >/dev/null; then
  log "compute-sanitizer memcheck (kernels, fixtures)"
  timeout 160 compute-sanitizer --tool memcheck --error-exitcode 9 "$tests" \
    --gtest_filter='CudaMatrixProducts.*:CudaEngine.LogitsAndPerplexity*' >"$out/memcheck.log" 2>&1
  log "memcheck exit $? ($(grep -E 'ERROR SUMMARY' "$out/memcheck.log" | tail -1))"
  tail -3 "$out/memcheck.log" >>"$out/summary.txt"
  # The routing kernel's warp shares shared memory: races and barriers, on
  # the fixtures' short runs (memcheck too, with the graphs). Its lanes
  # write equal values to the same places by design (kernels/common/
  # Routing.h), which racecheck may list as warnings; errors are what count.
  for tool in memcheck racecheck synccheck; do
    log "compute-sanitizer $tool (routing and prompts on the device, fixtures)"
    MOEC_PARITY_QUICK=1 timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 "$tests" \
      --gtest_filter='CudaEngine.RoutingOnTheDevice*:CudaEngine.PrefillOnTheDevice*' >"$out/routing-$tool.log" 2>&1
    log "$tool exit $? ($(grep -E 'SUMMARY' "$out/routing-$tool.log" | tail -1))"
    tail -3 "$out/routing-$tool.log" >>"$out/summary.txt"
  done
fi

# Where the product kernels stand against the hardware (Nsight Compute):
# throughput, occupancy and stalls of a few decode launches on Mixtral's
# large matrices, each one-token kernel forced in turn.
if want ncu && command -v ncu >/dev/null; then
  for kernel in streamed:streamedKernel warp-per-row:productKernel; do
    log "ncu: the ${kernel%%:*} product kernel on Mixtral shapes"
    timeout 120 ncu --clock-control none --kernel-name regex:"${kernel#*:}" --launch-skip 24 --launch-count 4 \
      --section SpeedOfLight --section Occupancy --section MemoryWorkloadAnalysis --section LaunchStats \
      --section WarpStateStats "$engine" --config "$root/bench/configs/mixtral-8x7b.json" --layers 2 \
      --format q4_g128_asym --device cuda --prompt 16 --decode 4 --step 1 --product-kernel "${kernel%%:*}" \
      >"$out/ncu-${kernel%%:*}.txt" 2>&1
    log "ncu exit $?"
    grep -E "streamedKernel|productKernel|Grid Size|Memory Throughput|DRAM Throughput|Achieved Occupancy|Duration|Registers Per" \
      "$out/ncu-${kernel%%:*}.txt" | head -36 >>"$out/summary.txt"
  done
fi
log "done"
