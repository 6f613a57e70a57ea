// RUN: rm -f %t.moestore && sed -e "s|@INPUTS@|%S/Inputs|" -e "s|@STORE@|%t.moestore|" %S/Inputs/four-experts.mlir > %t.mlir
// RUN: moe-opt %t.mlir --moe-merge-experts="stats=%S/Inputs/stats.safetensors ratio=0.25" | FileCheck %s
// RUN: not moe-opt %t.mlir --moe-merge-experts="stats=%S/Inputs/stats.safetensors method=dern groups=3 threshold=3" 2>&1 | FileCheck %s --check-prefix=THRESHOLD

// M-SMoE: the rarely routed expert 2 folds into its most similar centre
// (expert 0); every router row stays and maps to a slot.
// CHECK: moe.router @r top_k 2 {{.*}}remap = array<i64: 0, 1, 0, 2>
// CHECK: moe.expert 0 width 4 gate @g0.merge
// CHECK: moe.expert 1 width 4 gate @g1 up @u1 down @d1
// CHECK: moe.expert 2 width 4 gate @g3 up @u3 down @d3
// THRESHOLD: moe-merge-experts: threshold must be a cosine similarity in [-1, 1]
