//===- Sampling.cpp - The next token from logits --------------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Sampling.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace moe {

Expected<int32_t> sampleToken(const float *logits, int64_t vocab, const SamplingOptions &options,
                              std::mt19937_64 &rng) {
  // A NaN would also break the sort's ordering below.
  for (int64_t i = 0; i < vocab; ++i)
    if (!std::isfinite(logits[i]))
      return Status::error(
          "sampling: logit ", i, " is ", logits[i],
          ": the model computes non-finite values (NaN or infinity); its weights or config are broken");
  if (options.temperature <= 0.0)
    return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < vocab; ++i)
    order[i] = static_cast<int32_t>(i);
  int64_t k = options.topK > 0 ? std::min(options.topK, vocab) : vocab;
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  std::vector<double> weights(static_cast<size_t>(k));
  double total = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    weights[i] = std::exp((logits[order[i]] - logits[order[0]]) / options.temperature);
    total += weights[i];
  }
  // Uniform in [0, total) from 53 random bits: the same on every platform.
  double u = static_cast<double>(rng() >> 11) * 0x1.0p-53 * total;
  for (int64_t i = 0; i < k; ++i) {
    if (u < weights[i])
      return order[i];
    u -= weights[i];
  }
  return order[k - 1];
}

} // namespace moe
