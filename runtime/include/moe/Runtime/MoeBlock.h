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

/// NAEE's subset search without an expert run per subset. Every expert's
/// output e_j on each sample is computed once and kept only as products:
/// the Gram matrix <e_i, e_j>, <r, e_j> and <r, r> for the target r (the
/// cached output less the shared expert's part). The block output with
/// masked router rows is then r's error ||r - sum_k w_k e_k||^2 =
/// <r,r> - 2 sum_k w_k <r,e_k> + sum_kl w_k w_l <e_k,e_l>, which costs one
/// routing and K^2 products per sample, whatever the hidden width.
class MaskedBlockErrors {
public:
  /// Runs every expert of `layer` on `samples` (a layer without merged
  /// experts: the caller checks). Keeps pointers into `spec` and `weights`,
  /// which must outlive it. Memory: bytesPerSample(...) per sample.
  MaskedBlockErrors(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &weights,
                    const BlockSamplesView &samples);
  /// Sum over the samples of ||output - MoEBlock(input)||^2 with the router
  /// rows r where masked[r] != 0 switched off (as moeBlockOutputError,
  /// squared). Safe to call from several threads at once.
  double squaredError(const uint8_t *masked) const;
  static size_t bytesPerSample(int64_t experts, int64_t hidden);

private:
  const RouterSpec *router = nullptr;
  const float *correctionBias = nullptr;
  double skipThreshold = 0;
  int64_t count = 0, experts = 0;
  std::vector<float> logits;    ///< [count, E]
  std::vector<double> products; ///< per sample: <r,r>, <r,e_j> (E), Gram (E x E)
};

/// Per sampled token, the second-largest routed weight over the largest
/// (0 when the largest is 0).
std::vector<double> secondToFirstWeightRatios(const ModelSpec &spec, const LayerSpec &layer,
                                              const LayerWeights &weights, const BlockSamplesView &samples);

} // namespace moe

#endif // MOE_RUNTIME_MOEBLOCK_H
