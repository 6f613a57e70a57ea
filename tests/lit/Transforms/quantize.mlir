// RUN: rm -f %t.moestore && sed -e "s|@INPUTS@|%S/Inputs|" -e "s|@STORE@|%t.moestore|" %S/Inputs/four-experts.mlir > %t.mlir
// RUN: moe-opt %t.mlir --moe-quantize="bits=4 group=32" | FileCheck %s
// RUN: moe-opt %t.mlir --moe-quantize="bits=2 group=32 sym=true" | FileCheck %s --check-prefix=SYM
// RUN: not moe-opt %t.mlir --moe-quantize="bits=5" 2>&1 | FileCheck %s --check-prefix=BITS
// RUN: not moe-opt %t.mlir --moe-quantize="min-coverage=2" 2>&1 | FileCheck %s --check-prefix=COVERAGE
// RUN: not moe-opt %t.mlir --moe-quantize="shares=2 share=2" 2>&1 | FileCheck %s --check-prefix=SHARE
// moe.format (from moe-allocate-bits) is checked where moe-quantize reads it.
// RUN: sed -e 's|= "g0" in 0|= "g0" in 0 {moe.format = "q9_z"}|' %t.mlir > %t.badformat.mlir
// RUN: not moe-opt %t.badformat.mlir --moe-quantize 2>&1 | FileCheck %s --check-prefix=BADFORMAT
// RUN: sed -e 's|= "g0" in 0|= "g0" in 0 {moe.format = "q4_0"}|' %t.mlir > %t.blocks.mlir
// RUN: not moe-opt %t.blocks.mlir --moe-quantize 2>&1 | FileCheck %s --check-prefix=BLOCKS

// Expert matrices get codes in the store and a quant attribute; the router stays.
// CHECK: moe.tensor @r : tensor<4x8xbf16> = "r" in 0
// CHECK-NOT: quant
// CHECK: moe.tensor @g0 : tensor<4x8xbf16> = "g0.q4_g32_asym" quant <bits = 4, group = 32, scheme = "asym", format = "q4_g32_asym">
// CHECK: moe.tensor @d3 : tensor<8x4xbf16> = "d3.q4_g32_asym" quant
// SYM: "g0.q2_g32_sym" quant <bits = 2, group = 32, scheme = "sym", format = "q2_g32_sym">
// BITS: moe-quantize: {{.*}}5
// COVERAGE: moe-quantize: min-coverage must be a fraction of the calibration tokens in [0, 1]
// SHARE: moe-quantize: share must be in [0, shares) and shares at least 1, got share=2 shares=2
// BADFORMAT: moe-quantize: moe.format: 'q9_z' is not a format moec knows
// BLOCKS: moe-quantize: moe.format: rows of 8 values are not whole Q4_0 blocks of 32
