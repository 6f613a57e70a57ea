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
