// RUN: moe-opt %s --moe-set-topk="top-k=1" | FileCheck %s
// RUN: moe-opt %s --moe-set-topk="top-k=1 layers=1" | FileCheck %s --check-prefix=ONE
// RUN: not moe-opt %s --moe-set-topk="top-k=3" 2>&1 | FileCheck %s --check-prefix=TOOMANY
// RUN: not moe-opt %s --moe-set-topk="top-k=1 layers=7" 2>&1 | FileCheck %s --check-prefix=NOLAYER
// RUN: not moe-opt %s --moe-set-topk 2>&1 | FileCheck %s --check-prefix=MISSING

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 2 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
  moe.layer 1 {
    moe.moe_block {
      moe.router @r top_k 2 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// CHECK: moe.layer 0
// CHECK: moe.router @r top_k 1
// CHECK: moe.layer 1
// CHECK: moe.router @r top_k 1
// ONE: moe.layer 0
// ONE: moe.router @r top_k 2
// ONE: moe.layer 1
// ONE: moe.router @r top_k 1
// TOOMANY: error: moe-set-topk: top-k 3 exceeds the 2 experts of layer 0
// NOLAYER: error: moe-set-topk: layer 7 is not an MoE layer of the model
// MISSING: error: moe-set-topk: top-k must be at least 1, got 0
