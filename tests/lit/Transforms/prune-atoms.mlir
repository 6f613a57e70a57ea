// RUN: rm -f %t.moestore && sed -e "s|@INPUTS@|%S/Inputs|" -e "s|@STORE@|%t.moestore|" %S/Inputs/four-experts.mlir > %t.mlir
// RUN: moe-opt %t.mlir --moe-prune-atoms="method=magnitude ratio=0.5 scope=global" | FileCheck %s
// RUN: moe-opt %t.mlir --moe-prune-atoms="stats=%S/Inputs/stats.safetensors method=camera ratio=0.25" | FileCheck %s --check-prefix=CAMERA
// RUN: not moe-opt %t.mlir --moe-prune-atoms="method=magnitude ratio=nan" 2>&1 | FileCheck %s --check-prefix=NAN

// Global magnitude pruning takes the small neurons of the small experts first.
// CHECK: moe.tensor @g0.atoms : tensor<1x8xbf16>
// CHECK: moe.expert 0 width 1 gate @g0.atoms up @u0.atoms down @d0.atoms
// CHECK: moe.expert 3 width 3
// Per layer, CAMERA drops each expert's least active neuron.
// CAMERA-COUNT-4: moe.expert {{[0-3]}} width 3
// NaN compares false both ways; the range check says so instead of pruning nothing.
// NAN: moe-prune-atoms: ratio must be in [0, 1), got nan
