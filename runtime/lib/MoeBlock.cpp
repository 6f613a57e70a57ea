//===- MoeBlock.cpp - The engine's MoE block on cached samples ------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/MoeBlock.h"
#include "Kernels.h"
#include "Router.h"
#include "moe/Runtime/Engine.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

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

/// Every expert's output on every sample, and the router logits.
class AllExpertOutputs : public EngineObserver {
public:
  AllExpertOutputs(int64_t experts, int64_t tokens, int64_t hidden)
      : outputs(static_cast<size_t>(experts)), tokens(tokens), hidden(hidden) {}
  bool computeAllExperts() const override { return true; }
  void onRouter(int64_t, int64_t, std::span<const float> values, std::span<const int32_t>, std::span<const float>,
                std::span<const int32_t>) override {
    logits.assign(values.begin(), values.end());
  }
  void onExpert(int64_t, int64_t expert, std::span<const int32_t> tokenIndices, std::span<const float>,
                std::span<const float>, std::span<const float> output) override {
    std::vector<float> &values = outputs[static_cast<size_t>(expert)];
    values.assign(static_cast<size_t>(tokens * hidden), 0.0f);
    for (size_t r = 0; r < tokenIndices.size(); ++r)
      std::copy_n(output.begin() + static_cast<std::ptrdiff_t>(r) * hidden, hidden,
                  values.begin() + static_cast<std::ptrdiff_t>(tokenIndices[r]) * hidden);
  }
  std::vector<float> logits;
  std::vector<std::vector<float>> outputs; ///< per expert, [tokens, H]
  int64_t tokens, hidden;
};

} // namespace

size_t MaskedBlockErrors::bytesPerSample(int64_t experts, int64_t hidden) {
  return static_cast<size_t>(experts * hidden) * sizeof(float) * 2 +
         static_cast<size_t>(1 + experts + experts * experts) * sizeof(double) +
         static_cast<size_t>(experts) * sizeof(float);
}

MaskedBlockErrors::MaskedBlockErrors(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &weights,
                                     const BlockSamplesView &samples)
    : router(weights.routing.router ? &*weights.routing.router : &spec.router),
      correctionBias(weights.routerCorrectionBias.empty() ? nullptr : weights.routerCorrectionBias.data()),
      skipThreshold(weights.routing.skipThreshold), count(samples.count), experts(weights.router.rows) {
  const int64_t H = spec.hiddenSize, E = experts, T = count;
  AllExpertOutputs all(E, T, H);
  MoeBlockHooks hooks;
  hooks.observer = &all;
  // The routed experts only (the block's output here is scratch); the
  // shared expert, which no mask changes, once, into `target`.
  LayerSpec routedOnly = layer;
  routedOnly.shared.intermediateSize = 0;
  std::vector<float> target(static_cast<size_t>(T * H));
  moeBlockForward(spec, routedOnly, weights, samples.input, T, target.data(), hooks);
  logits = std::move(all.logits);
  std::fill(target.begin(), target.end(), 0.0f);
  addSharedExpert(spec, layer, weights, samples.input, T, target.data());
  const size_t stride = static_cast<size_t>(1 + E + E * E);
  products.assign(static_cast<size_t>(T) * stride, 0.0);
  kernels::parallelRows(T, T * E * E * H, [&](int64_t begin, int64_t end) {
    std::vector<double> r(static_cast<size_t>(H));
    for (int64_t t = begin; t < end; ++t) {
      double *p = products.data() + static_cast<size_t>(t) * stride;
      for (int64_t h = 0; h < H; ++h)
        r[h] = static_cast<double>(samples.output[t * H + h]) - target[t * H + h];
      double rr = 0;
      for (int64_t h = 0; h < H; ++h)
        rr += r[h] * r[h];
      p[0] = rr;
      for (int64_t i = 0; i < E; ++i) {
        const float *ei = all.outputs[static_cast<size_t>(i)].data() + t * H;
        double re = 0;
        for (int64_t h = 0; h < H; ++h)
          re += r[h] * ei[h];
        p[1 + i] = re;
        for (int64_t j = 0; j <= i; ++j) {
          const float *ej = all.outputs[static_cast<size_t>(j)].data() + t * H;
          double g = 0;
          for (int64_t h = 0; h < H; ++h)
            g += static_cast<double>(ei[h]) * ej[h];
          p[1 + E + i * E + j] = p[1 + E + j * E + i] = g;
        }
      }
    }
  });
}

double MaskedBlockErrors::squaredError(const uint8_t *masked) const {
  const int64_t E = experts, K = router->topK;
  const size_t stride = static_cast<size_t>(1 + E + E * E);
  thread_local std::vector<float> row, weights;
  thread_local std::vector<int32_t> chosen;
  row.resize(static_cast<size_t>(E));
  weights.resize(static_cast<size_t>(K));
  chosen.resize(static_cast<size_t>(K));
  double total = 0;
  for (int64_t t = 0; t < count; ++t) {
    const float *source = logits.data() + t * E;
    for (int64_t e = 0; e < E; ++e)
      row[e] = masked[e] ? -std::numeric_limits<float>::infinity() : source[e];
    router::route(*router, E, row.data(), correctionBias, chosen.data(), weights.data());
    router::skipWeakChoices(skipThreshold, K, weights.data());
    const double *p = products.data() + static_cast<size_t>(t) * stride;
    const double *gram = p + 1 + E;
    double error = p[0];
    for (int64_t k = 0; k < K; ++k) {
      const double wk = weights[k];
      error -= 2 * wk * p[1 + chosen[k]];
      for (int64_t l = 0; l < K; ++l)
        error += wk * weights[l] * gram[chosen[k] * E + chosen[l]];
    }
    total += std::max(error, 0.0);
  }
  return total;
}

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
