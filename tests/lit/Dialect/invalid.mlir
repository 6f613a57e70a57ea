// RUN: moe-opt %s -split-input-file -verify-diagnostics

moe.model @m family "mixtral" hidden 8 sources ["a.safetensors"] config "{}" {
  // expected-error @+1 {{'moe.tensor' op source 1 is not one of the model's 1 source files}}
  moe.tensor @t : tensor<8xbf16> = "t" in 1
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x5xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      // expected-error @+1 {{'moe.expert' op down @d has shape [8, 5], expected [8, 4]}}
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
  moe.layer 0 {
    moe.moe_block {
      // expected-error @+1 {{'moe.router' op top_k 2 exceeds the 1 live experts}}
      moe.router @r top_k 2 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<3x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      // expected-error @+1 {{'moe.router' op remap entry 7 is not a live expert id}}
      moe.router @r top_k 1 scoring "softmax" selection "top-k" {remap = array<i64: 0, 1, 7>}
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<3x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      // expected-error @+1 {{'moe.router' op weight @r has shape [3, 8], expected [2, 8]}}
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      // expected-error @+1 {{'moe.router' op weight @missing does not name a moe.tensor}}
      moe.router @missing top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      // expected-error @+1 {{custom op 'moe.router' scoring 'magic' is not softmax, sigmoid or sparsemixer}}
      moe.router @r top_k 1 scoring "magic" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
      // expected-error @+1 {{'moe.expert' op expert id 0 appears twice}}
      moe.expert 0 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    // expected-error @+1 {{'moe.moe_block' op needs a moe.router}}
    moe.moe_block {
      moe.expert 0 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  // expected-error @+1 {{'moe.tensor' op quantisation bits must be in [2, 8], got 12}}
  moe.tensor @q : tensor<4x8xbf16> = "q" quant #moe.quant<bits = 12, group = 32, scheme = "sym", format = "x">
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.layer 0 {
  }
  // expected-error @+1 {{'moe.layer' op layer 0 appears twice}}
  moe.layer 0 {
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources ["a.safetensors"] config "{}" {
  // expected-error @+1 {{'moe.tensor' op a slice of 4 rows needs a 2-D type with 4 rows}}
  moe.tensor @t : tensor<3x8xbf16> = "fused" in 0 slice [0, 0, 4, 0]
}

// -----

moe.model @m family "mixtral" hidden 8 sources ["a.safetensors"] config "{}" {
  // expected-error @+1 {{'moe.tensor' op slice must be [matrix >= 0, first row >= 0, rows >= 1, transposed 0|1]}}
  moe.tensor @t : tensor<4x8xbf16> = "fused" in 0 slice [0, 0, 4, 2]
}

// -----

// The parts of a split expert tile its neurons in order.
moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d {part_offset = 0 : i64}
      // expected-error @+1 {{'moe.expert' op part_offset 3 of expert 0, expected 4 (the parts tile the neurons in order)}}
      moe.expert 0 width 4 gate @g up @u down @d {part_offset = 3 : i64}
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d {part_offset = 0 : i64}
      // expected-error @+1 {{'moe.expert' op expert id 0 appears twice (the parts of a split expert carry part_offset)}}
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      // expected-error @+1 {{'moe.expert' op the first part of expert 0 has part_offset 4, expected 0}}
      moe.expert 0 width 4 gate @g up @u down @d {part_offset = 4 : i64}
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "phimoe" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      // expected-error @+1 {{'moe.router' op sparsemixer scoring selects exactly 2 experts, top_k is 1}}
      moe.router @r top_k 1 scoring "sparsemixer" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

// expected-error @+1 {{'moe.model' op hidden size must be positive, got 0}}
moe.model @m family "mixtral" hidden 0 sources [] config "{}" {
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  // expected-error @+1 {{'moe.tensor' op tensor type must have a static shape}}
  moe.tensor @t : tensor<?x8xbf16> = "t"
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  // expected-error @+1 {{'moe.tensor' op quantisation group must be positive, got 0}}
  moe.tensor @q : tensor<4x8xbf16> = "q" quant #moe.quant<bits = 4, group = 0, scheme = "asym", format = "q4_g0_asym">
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  // expected-error @+1 {{'moe.layer' op has 2 moe.moe_block ops, expected at most one}}
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
    }
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  // expected-error @+1 {{'moe.dense' op tensor 'weight' must be a symbol reference}}
  moe.dense "embedding" {weight = 3}
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      // expected-error @+1 {{'moe.router' op is the second router of its moe.moe_block}}
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<0x8xbf16> = "r"
  moe.layer 0 {
    // expected-error @+1 {{'moe.moe_block' op needs at least one moe.expert}}
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    // expected-error @+1 {{'moe.moe_block' op has 2 moe.shared_expert ops, expected at most one}}
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
      moe.shared_expert width 4 gate @g up @u down @d
      moe.shared_expert width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      // expected-error @+1 {{'moe.router' op top_k must be positive, got 0}}
      moe.router @r top_k 0 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      // expected-error @+1 {{custom op 'moe.router' selection 'magic' is not top-k, group-max or group-top2-sum}}
      moe.router @r top_k 1 scoring "softmax" selection "magic"
      moe.expert 0 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "deepseek_v3" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<3x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      // expected-error @+1 {{'moe.router' op group-limited selection needs groups dividing the 3 router rows and 1 <= top_k_groups <= groups}}
      moe.router @r top_k 1 scoring "sigmoid" selection "group-max" {groups = 2 : i64, top_k_groups = 1 : i64}
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
      moe.expert 2 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      // expected-error @+1 {{'moe.expert' op width must be positive, got 0}}
      moe.expert 0 width 0 gate @g up @u down @d
    }
  }
}

// -----

// Renumbered experts keep their checkpoint id as origin; two experts with
// one origin would make reports name the wrong expert.
moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert 0 width 4 gate @g up @u down @d {origin = 3 : i64}
      // expected-error @+1 {{'moe.expert' op origin 3 of expert 1 is another expert's}}
      moe.expert 1 width 4 gate @g up @u down @d {origin = 3 : i64}
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      // expected-error @+1 {{'moe.expert' op origin -2 is negative}}
      moe.expert 0 width 4 gate @g up @u down @d {origin = -2 : i64}
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

// Factored experts (moe-factor-experts): a base needs factored experts.
moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<2x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert_base width 4 gate @g up @u down @d
      // expected-error @+1 {{'moe.expert' op expert 0 is not factored, but its block has a moe.expert_base}}
      moe.expert 0 width 4 gate @g up @u down @d
      moe.expert 1 width 4 gate @g up @u down @d
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
  moe.tensor @ga : tensor<4x2xbf16> = "ga"
  moe.tensor @gb : tensor<2x8xbf16> = "gb"
  moe.tensor @da : tensor<8x2xbf16> = "da"
  moe.tensor @db : tensor<2x4xbf16> = "db"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      // expected-error @+1 {{'moe.expert' op expert 0 has low_rank factors, but its block has no moe.expert_base}}
      moe.expert 0 width 4 gate @ga up @ga down @da {low_rank = [@gb, @gb, @db]}
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.tensor @ga : tensor<4x2xbf16> = "ga"
  moe.tensor @gb : tensor<3x8xbf16> = "gb"
  moe.tensor @da : tensor<8x2xbf16> = "da"
  moe.tensor @db : tensor<2x4xbf16> = "db"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert_base width 4 gate @g up @u down @d
      // expected-error @+1 {{'moe.expert' op gate right factor @gb has shape [3, 8], expected [2, 8]}}
      moe.expert 0 width 4 gate @ga up @ga down @da {low_rank = [@gb, @gb, @db]}
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
  moe.tensor @g : tensor<4x8xbf16> = "g"
  moe.tensor @u : tensor<4x8xbf16> = "u"
  moe.tensor @d : tensor<8x4xbf16> = "d"
  moe.tensor @ga : tensor<4x5xbf16> = "ga"
  moe.layer 0 {
    moe.moe_block {
      moe.router @r top_k 1 scoring "softmax" selection "top-k"
      moe.expert_base width 4 gate @g up @u down @d
      // expected-error @+1 {{'moe.expert' op gate left factor @ga must be [4, rank] with 1 <= rank <= 4}}
      moe.expert 0 width 4 gate @ga up @ga down @ga {low_rank = [@ga, @ga, @ga]}
    }
  }
}

// -----

moe.model @m family "mixtral" hidden 8 sources [] config "{}" {
  moe.tensor @r : tensor<1x8xbf16> = "r"
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
      // expected-error @+1 {{'moe.expert' op low_rank names 2 right factors, expected 3 (gate, up, down)}}
      moe.expert 0 width 4 gate @ga up @ga down @da {low_rank = [@gb, @gb]}
    }
  }
}
