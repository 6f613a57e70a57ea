#!/usr/bin/env bash
# Runs each libFuzzer target for SECONDS on a working copy of its seed corpus.
# Usage: fuzz/run.sh BUILD_DIR SECONDS
set -euo pipefail
build=$1
seconds=${2:-600}
here=$(cd "$(dirname "$0")" && pwd)
# Both targets run at once, one per core.
run_target() {
  target=$1
  work="$here/corpus-work/$target"
  mkdir -p "$work"
  cp -n "$here/corpus/$target"/* "$work"/ 2>/dev/null || true
  echo "== fuzz-$target for ${seconds}s"
  "$build/fuzz/fuzz-$target" "$work" -max_total_time="$seconds" -max_len=65536 \
    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$here/corpus-work/$target-" 2>&1 |
    grep -E "^#[0-9]+[[:space:]]+(DONE|INITED)|stat::|ERROR|SUMMARY|Test unit written" > "$here/corpus-work/$target.log" || true
  cat "$here/corpus-work/$target.log"
}
run_target safetensors-header &
run_target model-config &
wait
