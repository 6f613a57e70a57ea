// RUN: moe-opt %s -split-input-file -verify-diagnostics --moe-mix-experts="mix=0:1=0.5*1|0.5*2"
// RUN: not moe-opt %s -split-input-file --moe-mix-experts="mix=0:1=half*1" 2>&1 | FileCheck %s --check-prefix=TEXT
// TEXT: moe-mix-experts: mix: expected 'coefficient*source' (a finite number, an expert id) in expert 1 of layer 0, got 'half*1'

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  // expected-error @+1 {{moe-mix-experts: layer 0 has no expert 2 (a source)}}
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

// expected-error @+1 {{moe-mix-experts: layer 0 does not exist}}
moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
}
