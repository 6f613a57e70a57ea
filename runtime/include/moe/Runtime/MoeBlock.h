//===- MoeBlock.h - The engine's MoE block on cached samples ----*- C++ -*-===//
//
// Part of moec. The one narrow door from the passes into the engine: the
// engine's own routed MoE block run on cached block inputs (calibration's
// block samples), for methods that measure reconstruction error (NAEE,
// MC-MoE) or routing weights (NAEE's dynamic skipping) without running the
// model. Passes include this, never Engine.h.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_MOEBLOCK_H
#define MOE_RUNTIME_MOEBLOCK_H

#include "moe/Runtime/Weights.h"

#include <cstdint>
#include <set>
#include <vector>

namespace moe {

/// Cached block inputs and the outputs the original model gave for them,
/// [count, hidden] each, row-major.
struct BlockSamplesView {
  const float *input = nullptr;
  const float *output = nullptr;
  int64_t count = 0;
};

/// ||output - MoEBlock(input)||_F of layer `layer` with `weights`, the
/// router rows in `maskedRows` (when given) switched off; `scratch` holds
/// the recomputed outputs.
double moeBlockOutputError(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &weights,
                           const BlockSamplesView &samples, const std::set<int64_t> *maskedRows,
                           std::vector<float> &scratch);

/// Per sampled token, the second-largest routed weight over the largest
/// (0 when the largest is 0).
std::vector<double> secondToFirstWeightRatios(const ModelSpec &spec, const LayerSpec &layer,
                                              const LayerWeights &weights, const BlockSamplesView &samples);

} // namespace moe

#endif // MOE_RUNTIME_MOEBLOCK_H
