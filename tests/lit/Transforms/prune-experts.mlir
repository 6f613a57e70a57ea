// RUN: rm -f %t.moestore && sed -e "s|@INPUTS@|%S/Inputs|" -e "s|@STORE@|%t.moestore|" %S/Inputs/four-experts.mlir > %t.mlir
// RUN: moe-opt %t.mlir --moe-prune-experts="stats=%S/Inputs/stats.safetensors ratio=0.25" | FileCheck %s
// RUN: moe-opt %t.mlir --moe-prune-experts="stats=%S/Inputs/stats.safetensors method=easy-ep keep=2" | FileCheck %s --check-prefix=KEEP

// Expert 2 was routed least: it goes, the router loses its row.
// CHECK: moe.tensor @r.drop : tensor<3x8xbf16>
// CHECK: moe.router @r.drop top_k 2
// CHECK: moe.expert 0 {{.*}} gate @g0
// CHECK: moe.expert 1 {{.*}} gate @g1
// CHECK: moe.expert 2 {{.*}} gate @g3
// CHECK-NOT: gate @g2
// KEEP: moe.tensor @r.drop : tensor<2x8xbf16>
// KEEP: gate @g0
// KEEP-NOT: gate @g1
// KEEP-NOT: gate @g2
// KEEP: gate @g3
