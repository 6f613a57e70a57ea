// RUN: moe-opt %s | moe-opt | FileCheck %s
// RUN: moe-opt %s --mlir-print-op-generic | moe-opt | FileCheck %s

// CHECK-LABEL: moe.model @tiny family "deepseek_v2" hidden 8 sources ["model.safetensors"] config "{}" store "tiny.moestore"
moe.model @tiny family "deepseek_v2" hidden 8 sources ["model.safetensors"] config "{}" store "tiny.moestore" {
  // CHECK: moe.tensor @embed : tensor<16x8xbf16> = "model.embed_tokens.weight" in 0
  moe.tensor @embed : tensor<16x8xbf16> = "model.embed_tokens.weight" in 0
  moe.tensor @router : tensor<3x8xbf16> = "model.layers.0.mlp.gate.weight" in 0
  moe.tensor @bias : tensor<3xf32> = "model.layers.0.mlp.gate.e_score_correction_bias" in 0
  moe.tensor @g0 : tensor<4x8xbf16> = "g0" in 0
  moe.tensor @u0 : tensor<4x8xbf16> = "u0" in 0
  moe.tensor @d0 : tensor<8x4xbf16> = "d0" in 0
  // CHECK: moe.tensor @g1 : tensor<2x8xbf16> = "experts.1.gate" quant <bits = 4, group = 32, scheme = "asym", format = "q4_g32_asym">
  moe.tensor @g1 : tensor<2x8xbf16> = "experts.1.gate" quant #moe.quant<bits = 4, group = 32, scheme = "asym", format = "q4_g32_asym">
  moe.tensor @u1 : tensor<2x8xbf16> = "experts.1.up"
  moe.tensor @d1 : tensor<8x2xbf16> = "experts.1.down"
  moe.tensor @sg : tensor<6x8xbf16> = "sg" in 0
  moe.tensor @su : tensor<6x8xbf16> = "su" in 0
  moe.tensor @sd : tensor<8x6xbf16> = "sd" in 0
  moe.tensor @sgate : tensor<1x8xbf16> = "sgate" in 0
  // CHECK: moe.dense "embedding" {weight = @embed}
  moe.dense "embedding" {weight = @embed}
  // CHECK: moe.layer 0 {
  moe.layer 0 {
    moe.moe_block {
      // CHECK: moe.router @router top_k 2 scoring "sigmoid" selection "top-k" {correction_bias = @bias, normalize = true, remap = array<i64: 0, 1, 1>, scaling = 2.500000e+00 : f64}
      moe.router @router top_k 2 scoring "sigmoid" selection "top-k" {correction_bias = @bias, normalize = true, remap = array<i64: 0, 1, 1>, scaling = 2.5 : f64}
      // CHECK: moe.expert 0 width 4 gate @g0 up @u0 down @d0
      moe.expert 0 width 4 gate @g0 up @u0 down @d0
      // CHECK: moe.expert 1 width 2 gate @g1 up @u1 down @d1
      moe.expert 1 width 2 gate @g1 up @u1 down @d1
      // CHECK: moe.shared_expert width 6 gate @sg up @su down @sd gated_by @sgate
      moe.shared_expert width 6 gate @sg up @su down @sd gated_by @sgate
    }
  }
}

// -----

// A split expert (micro-expert mixed precision): one router row, two parts.
// CHECK-LABEL: moe.model @split
// CHECK: moe.expert 0 width 4 gate @g up @u down @d {part_offset = 0 : i64}
// CHECK-NEXT: moe.expert 0 width 4 gate @g up @u down @d {part_offset = 4 : i64}
// CHECK-NEXT: moe.expert 1 width 4
moe.model @split family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d {part_offset = 0 : i64}
      moe.expert 0 width 4 gate @g up @u down @d {part_offset = 4 : i64}
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

// Factored experts (moe-factor-experts): a base, and per expert left factors
// in gate/up/down with the right factors in low_rank.
// CHECK-LABEL: moe.model @factored
// CHECK: moe.expert_base width 4 gate @g up @u down @d
// CHECK-NEXT: moe.expert 0 width 4 gate @ga up @ga down @da {low_rank = [@gb, @gb, @db]}
moe.model @factored family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.tensor @ga : tensor<4x2xbf16> = "ga"
  moe.tensor @gb : tensor<2x8xbf16> = "gb"
  moe.tensor @da : tensor<8x2xbf16> = "da"
  moe.tensor @db : tensor<2x4xbf16> = "db"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert_base width 4 gate @g up @u down @d
      moe.expert 0 width 4 gate @ga up @ga down @da {low_rank = [@gb, @gb, @db]}
      moe.expert 1 width 4 gate @ga up @ga down @da {low_rank = [@gb, @gb, @db]}
    }
  }
}
