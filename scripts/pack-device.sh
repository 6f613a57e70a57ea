#!/usr/bin/env bash
# Prepares a run of bench/device-check.sh on a GPU machine that cannot build
# moec (no Debian packages there, no network): copies the CUDA tests and the
# benchmark built here, the shared libraries they need beyond glibc and
# libstdc++, and packages made by the recipes of examples/ into one archive,
# .device/device.tar.xz (ignored by git), which device-check.sh unpacks and
# uses when present. Every recipe kind is there (pruned, merged, atoms,
# mixed precision, dynamic skip, plain RTN) on one fixture or the other
# (both decode with the residual stream on the device: tiny-mixtral's
# grouped-query attention, tiny-deepseek's MLA), and qwen3_moe as four
# query heads over one KV head at 4 bits, within what a device run
# carries (64 MiB with the repository).
# Run after `make build`; the CUDA toolkit must be installed here.
#
#   scripts/pack-device.sh [BUILD_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
out=$root/.device/stage
cmake --build "$build" -j2 --target moec moec-cuda-tests cuda_engine write-grouped-variant >/dev/null
rm -rf "$root/.device" && mkdir -p "$out/bin" "$out/packages" "$out/lib"
cp "$build/tests/moec-cuda-tests" "$build/bench/cuda_engine" "$out/bin/"
# Libraries a bare image lacks: everything ldd resolves outside glibc and
# the compiler's runtime (present on any Linux with a C++ toolchain).
for binary in "$out"/bin/*; do
  ldd "$binary" | awk '$3 ~ /^\// {print $3}'
done | sort -u | grep -Ev '/(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' |
  while read -r library; do cp -L "$library" "$out/lib/"; done
for made in tiny-deepseek:quantize \
  tiny-mixtral:gptq-mixed tiny-mixtral:prune-experts tiny-mixtral:merge-experts tiny-mixtral:dynamic-skip \
  tiny-mixtral:prune-atoms; do
  fixture=${made%%:*} name=${made#*:}
  "$build/tools/moec" compress "$root/tests/data/fixtures/$fixture" --recipe "$root/examples/recipes/$name.json" \
    -o "$out/packages/$fixture-$name.moepkg" --quiet >/dev/null
done
# Experts split into parts of different formats (micro-expert bit allocation).
cat >"$out/micro.json" <<RECIPE
{"calibration": {"data": "$root/tests/data/brown/calibration.jsonl", "tokens": 8192, "block_samples": 512},
 "passes": [{"pass": "moe-allocate-bits", "options": {"budget": 3.0, "candidates": "2,3,4", "group": 64,
                                                      "granularity": "micro-expert"}},
            {"pass": "moe-quantize", "options": {"group": 64, "targets": "experts"}}]}
RECIPE
"$build/tools/moec" compress "$root/tests/data/fixtures/tiny-mixtral" --recipe "$out/micro.json" \
  -o "$out/packages/tiny-mixtral-micro-experts.moepkg" --quiet >/dev/null
# Grouped-query attention whose output projection's groups divide a head:
# a block of attention takes four query heads and rounds their values
# (tests/unit/cuda/GroupedVariant.h).
"$build/tests/write-grouped-variant" "$root/tests/data/hf/qwen3_moe" "$out/qwen3-gqa" 4 1 32
"$build/tools/moec" compress "$out/qwen3-gqa" --recipe "$root/tests/data/recipes/q4-g32-all.json" \
  -o "$out/packages/qwen3-gqa-q4-g32.moepkg" --quiet >/dev/null
rm -rf "$out/qwen3-gqa"
rm -f "$out"/packages/*.json "$out/micro.json"
tar -C "$out" -cf - bin lib packages | xz -T2 -6 >"$root/.device/device.tar.xz"
rm -rf "$out"
du -sh "$root/.device/device.tar.xz"
