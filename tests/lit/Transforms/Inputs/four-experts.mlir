// One MoE layer of four experts over Inputs/weights.safetensors (see
// make_inputs.py); @INPUTS@ and @STORE@ are filled in by each test.
moe.model @m family "mixtral" hidden 8 sources ["@INPUTS@/weights.safetensors"] config "{}" store "@STORE@" {
  moe.tensor @r : tensor<4x8xbf16> = "r" in 0
  moe.tensor @g0 : tensor<4x8xbf16> = "g0" in 0
  moe.tensor @u0 : tensor<4x8xbf16> = "u0" in 0
  moe.tensor @d0 : tensor<8x4xbf16> = "d0" in 0
  moe.tensor @g1 : tensor<4x8xbf16> = "g1" in 0
  moe.tensor @u1 : tensor<4x8xbf16> = "u1" in 0
  moe.tensor @d1 : tensor<8x4xbf16> = "d1" in 0
  moe.tensor @g2 : tensor<4x8xbf16> = "g2" in 0
  moe.tensor @u2 : tensor<4x8xbf16> = "u2" in 0
  moe.tensor @d2 : tensor<8x4xbf16> = "d2" in 0
  moe.tensor @g3 : tensor<4x8xbf16> = "g3" in 0
  moe.tensor @u3 : tensor<4x8xbf16> = "u3" in 0
  moe.tensor @d3 : tensor<8x4xbf16> = "d3" in 0
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 2 scoring "softmax" selection "top-k" {normalize = true}
      moe.expert 0 width 4 gate @g0 up @u0 down @d0
      moe.expert 1 width 4 gate @g1 up @u1 down @d1
      moe.expert 2 width 4 gate @g2 up @u2 down @d2
      moe.expert 3 width 4 gate @g3 up @u3 down @d3
    }
  }
}
