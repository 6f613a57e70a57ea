// RUN: rm -f %t.moestore && sed -e "s|@INPUTS@|%S/Inputs|" -e "s|@STORE@|%t.moestore|" %S/Inputs/four-experts.mlir > %t.mlir
// RUN: moe-opt %t.mlir --moe-drop-experts="experts=0:1,2" | FileCheck %s

// CHECK: moe.tensor @r.drop : tensor<2x8xbf16>
// CHECK: moe.expert 0 width 4 gate @g0
// CHECK-NEXT: moe.expert 1 width 4 gate @g3
