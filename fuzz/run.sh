#!/usr/bin/env bash
# Runs each libFuzzer target for SECONDS on a working copy of its seed corpus,
# two at a time (one per core). Usage: fuzz/run.sh BUILD_DIR SECONDS [TARGET...]
set -euo pipefail
build=$1
seconds=${2:-600}
shift 2 || true
here=$(cd "$(dirname "$0")" && pwd)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(safetensors-header model-config package-manifest tokenizer module recipe)
run_target() {
  target=$1
  work="$here/corpus-work/$target"
  mkdir -p "$work"
  cp -n "$here/corpus/$target"/* "$work"/ 2>/dev/null || true
  max_len=65536
  [ "$target" = tokenizer ] && max_len=262144
  "$build/fuzz/fuzz-$target" "$work" -max_total_time="$seconds" -max_len=$max_len -timeout=30 \
    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$here/corpus-work/$target-" 2>&1 |
    grep -E "^#[0-9]+[[:space:]]+(DONE|INITED)|stat::|ERROR|SUMMARY|Test unit written" > "$here/corpus-work/$target.log" || true
  echo "== fuzz-$target for ${seconds}s"
  cat "$here/corpus-work/$target.log"
}
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  run_target "${targets[i]}" &
  [ $((i + 1)) -lt ${#targets[@]} ] && run_target "${targets[i + 1]}" &
  wait
done
