// RUN: moe-opt %s -split-input-file -verify-diagnostics --moe-drop-experts="experts=0:1"

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      // expected-error @+1 {{moe-drop-experts: layer 0 would keep 1 experts, fewer than top_k 2; lower it with moe-set-topk first}}
      moe.router @r top_k 2 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  // expected-error @+1 {{moe-drop-experts: layer 0 has no expert 1}}
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
    }
  }
}

// -----

// expected-error @+1 {{moe-drop-experts: layer 0 does not exist}}
moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
}
