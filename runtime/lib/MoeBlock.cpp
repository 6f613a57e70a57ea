//===- MoeBlock.cpp - The engine's MoE block on cached samples ------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/MoeBlock.h"
#include "moe/Runtime/Engine.h"

#include <algorithm>
#include <cmath>
#include <functional>

namespace moe {

namespace {

/// w2 / w1 of every token the router sees.
class WeightRatios : public EngineObserver {
public:
  void onRouter(int64_t, int64_t tokens, std::span<const float>, std::span<const int32_t> chosen,
                std::span<const float> weights, std::span<const int32_t>) override {
    const int64_t K = static_cast<int64_t>(chosen.size()) / tokens;
    for (int64_t t = 0; t < tokens; ++t) {
      std::vector<float> sorted(weights.begin() + t * K, weights.begin() + (t + 1) * K);
      std::sort(sorted.begin(), sorted.end(), std::greater<float>());
      ratios.push_back(K > 1 && sorted[0] > 0 ? sorted[1] / sorted[0] : 0.0);
    }
  }
  std::vector<double> ratios;
};

} // namespace

double moeBlockOutputError(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &weights,
                           const BlockSamplesView &samples, const std::set<int64_t> *maskedRows,
                           std::vector<float> &scratch) {
  const size_t values = static_cast<size_t>(samples.count * spec.hiddenSize);
  scratch.resize(values);
  MoeBlockHooks hooks;
  hooks.maskedRows = maskedRows;
  moeBlockForward(spec, layer, weights, samples.input, samples.count, scratch.data(), hooks);
  double error = 0;
  for (size_t i = 0; i < values; ++i) {
    const double difference = static_cast<double>(samples.output[i]) - scratch[i];
    error += difference * difference;
  }
  return std::sqrt(error);
}

std::vector<double> secondToFirstWeightRatios(const ModelSpec &spec, const LayerSpec &layer,
                                              const LayerWeights &weights, const BlockSamplesView &samples) {
  WeightRatios ratios;
  MoeBlockHooks hooks;
  hooks.observer = &ratios;
  std::vector<float> output(static_cast<size_t>(samples.count * spec.hiddenSize));
  moeBlockForward(spec, layer, weights, samples.input, samples.count, output.data(), hooks);
  return std::move(ratios.ratios);
}

} // namespace moe
