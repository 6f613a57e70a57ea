#!/usr/bin/env bash
# Regenerates the seed corpora of the package-manifest, module, tokenizer and
# recipe fuzzers from the committed test checkpoints. Usage:
#   fuzz/make_seeds.sh BUILD_DIR
set -euo pipefail
build=$1
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
moec="$build/tools/moec"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$here/corpus/package-manifest" "$here/corpus/module" "$here/corpus/tokenizer" "$here/corpus/recipe"
for family in mixtral qwen2_moe qwen3_moe olmoe deepseek_v2 deepseek_v3 phimoe; do
  "$moec" import "$root/tests/data/hf/$family" -o "$work/$family.mlir" > /dev/null
  # Paths in the seed are the fuzzer's, not this machine's.
  sed "s|$root/tests/data/hf/$family/||g; s|$work/||g" "$work/$family.mlir" > "$here/corpus/module/$family.mlir"
  pipeline="moe-set-topk{top-k=2}"
  [ "$family" = mixtral ] && pipeline="moe-quantize{bits=4 group=32 targets=experts,attention}"
  [ "$family" = olmoe ] && pipeline="moe-quantize{bits=2 group=32 sym=true}"
  "$moec" opt "$work/$family.mlir" --pipeline "$pipeline" -o "$work/$family-c.mlir"
  "$moec" emit "$work/$family-c.mlir" -o "$work/$family.moepkg" > /dev/null
  # The manifest, with offsets relative to the data region (the harness
  # lays the package out again around it).
  python3 - "$work/$family.moepkg" "$here/corpus/package-manifest/$family.json" <<'PY'
import json, struct, sys
data = open(sys.argv[1], 'rb').read()
manifest_offset, manifest_bytes, data_offset = struct.unpack_from('<QQQ', data, 16)
manifest = json.loads(data[manifest_offset:manifest_offset + manifest_bytes])
manifest['tokenizer'] = ''  # large and covered by the tokenizer fuzzer
for tensor in manifest['tensors'].values():
    tensor['offset'] -= data_offset
json.dump(manifest, open(sys.argv[2], 'w'), sort_keys=True, separators=(',', ':'))
PY
done
for tokenizer in gpt2-nfc sp-legacy sp-metaspace split-chain; do
  cp "$root/tests/data/tokenizers/$tokenizer/tokenizer.json" "$here/corpus/tokenizer/$tokenizer.json"
done
cp "$root"/examples/recipes/*.json "$here/corpus/recipe/"
