#!/usr/bin/env bash
# Held-out perplexity of the fixtures after expert pruning, per method and
# ratio, calibrated on the calibration split (training documents ending in 1).
# Prints one JSON object per line. Usage: bench/prune_quality.sh BUILD_DIR
set -euo pipefail
build=${1:-build}
here=$(cd "$(dirname "$0")/.." && pwd)
moec="$build/compiler/tools/moec"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
heldout="$here/tests/data/brown/heldout.jsonl"
for fixture in tiny-mixtral tiny-deepseek; do
  model="$here/tests/data/fixtures/$fixture"
  "$moec" calibrate "$model" --data "$here/tests/data/brown/calibration.jsonl" -o "$work/$fixture.stats.safetensors" >/dev/null
  "$moec" import "$model" -o "$work/$fixture.mlir"
  ppl=$("$moec" eval "$model" --data "$heldout" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["perplexity"])')
  echo "{\"fixture\": \"$fixture\", \"method\": \"original\", \"ratio\": 0, \"perplexity\": $ppl}"
  for method in frequency gate-weight easy-ep; do
    for ratio in 0.25 0.5; do
      out="$work/$fixture-$method-$ratio"
      "$moec" opt "$work/$fixture.mlir" --pipeline "moe-prune-experts{stats=$work/$fixture.stats.safetensors method=$method ratio=$ratio}" -o "$out.mlir"
      "$moec" export "$out.mlir" --format hf -o "$out"
      ppl=$("$moec" eval "$out" --data "$heldout" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["perplexity"])')
      echo "{\"fixture\": \"$fixture\", \"method\": \"$method\", \"ratio\": $ratio, \"perplexity\": $ppl}"
    done
  done
done
