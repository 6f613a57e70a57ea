// RUN: moe-opt %s -split-input-file -verify-diagnostics

moe.model @m family "mixtral" hidden 4 sources [] config "{}" {
  // expected-error @+1 {{unknown quantisation format 'q5_g64_asym'}}
  moe.tensor @w : tensor<4x4xbf16> = "w" quant #moe.quant<bits = 5, group = 64, scheme = "asym", format = "q5_g64_asym">
}

// -----

moe.model @m family "mixtral" hidden 4 sources [] config "{}" {
  // expected-error @+1 {{quantisation format 'q4_g64_asym' disagrees with bits = 4, group = 128, scheme = "asym"}}
  moe.tensor @w : tensor<4x4xbf16> = "w" quant #moe.quant<bits = 4, group = 128, scheme = "asym", format = "q4_g64_asym">
}

// -----

moe.model @m family "mixtral" hidden 4 sources [] config "{}" {
  // expected-error @+1 {{only matrices can be quantised}}
  moe.tensor @w : tensor<4xbf16> = "w" quant #moe.quant<bits = 4, group = 64, scheme = "asym", format = "q4_g64_asym">
}

// -----

// llama.cpp's block formats: rows must be whole blocks.
moe.model @m family "mixtral" hidden 4 sources [] config "{}" {
  // expected-error @+1 {{quantisation format 'q4_k': rows of 160 values are not whole Q4_K blocks of 256}}
  moe.tensor @w : tensor<4x160xbf16> = "w" quant #moe.quant<bits = 4, group = 256, scheme = "ggml", format = "q4_k">
}

// -----

moe.model @m family "mixtral" hidden 4 sources [] config "{}" {
  // expected-error @+1 {{quantisation format 'q4_0' disagrees with bits = 4, group = 32, scheme = "sym"}}
  moe.tensor @w : tensor<4x64xbf16> = "w" quant #moe.quant<bits = 4, group = 32, scheme = "sym", format = "q4_0">
}
