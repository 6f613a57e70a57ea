#!/usr/bin/env bash
# Prepares a run of bench/device-check.sh on a GPU machine that cannot build
# moec (no Debian packages there, no network): copies the CUDA tests and the
# benchmark built here, the shared libraries they need beyond glibc and
# libstdc++, and packages made by the recipes of examples/ into one archive,
# .device/device.tar.xz (ignored by git), which device-check.sh unpacks and
# uses when present. Every recipe kind is there (pruned, merged, atoms,
# mixed precision, dynamic skip, plain RTN) on one fixture or the other, to
# stay within what a device run carries (64 MiB with the repository).
# Run after `make build`; the CUDA toolkit must be installed here.
#
#   scripts/pack-device.sh [BUILD_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
out=$root/.device/stage
cmake --build "$build" -j2 --target moec moec-cuda-tests cuda_engine >/dev/null
rm -rf "$root/.device" && mkdir -p "$out/bin" "$out/packages" "$out/lib"
cp "$build/tests/moec-cuda-tests" "$build/bench/cuda_engine" "$out/bin/"
# Libraries a bare image lacks: everything ldd resolves outside glibc and
# the compiler's runtime (present on any Linux with a C++ toolchain).
for binary in "$out"/bin/*; do
  ldd "$binary" | awk '$3 ~ /^\// {print $3}'
done | sort -u | grep -Ev '/(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' |
  while read -r library; do cp -L "$library" "$out/lib/"; done
for made in tiny-deepseek:merge-experts tiny-deepseek:prune-atoms tiny-deepseek:dynamic-skip \
  tiny-deepseek:quantize tiny-mixtral:gptq-mixed tiny-mixtral:prune-experts; do
  fixture=${made%%:*} name=${made#*:}
  "$build/tools/moec" compress "$root/tests/data/fixtures/$fixture" --recipe "$root/examples/recipes/$name.json" \
    -o "$out/packages/$fixture-$name.moepkg" --quiet >/dev/null
done
rm -f "$out"/packages/*.json
tar -C "$out" -cf - bin lib packages | xz -T2 -6 >"$root/.device/device.tar.xz"
rm -rf "$out"
du -sh "$root/.device/device.tar.xz"
