//===- EngineComparison.h - Two engines' outputs compared -------*- C++ -*-===//
//
// Part of moec. The largest differences between the logits and the KV
// caches of the engine on a device and the engine on the CPU, shared by the
// GPU tests (CudaEngineTest, HostWorkTest).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_TESTS_UNIT_CUDA_ENGINECOMPARISON_H
#define MOE_TESTS_UNIT_CUDA_ENGINECOMPARISON_H

#include "moe/Runtime/Engine.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace moe::testing {

/// The largest |a[i] - b[i]|; infinite where the sizes differ.
inline double maxDifference(const std::vector<float> &a, const std::vector<float> &b) {
  double most = a.size() == b.size() ? 0 : INFINITY;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    most = std::max(most, static_cast<double>(std::fabs(a[i] - b[i])));
  return most;
}

/// The largest difference between two caches' keys and values; infinite
/// where their layers or rows differ in number.
inline double maxCacheDifference(const KvCache &a, const KvCache &b) {
  double most = a.keys.size() == b.keys.size() ? 0 : INFINITY;
  for (size_t l = 0; l < std::min(a.keys.size(), b.keys.size()); ++l) {
    most = std::max(most, maxDifference(a.keys[l], b.keys[l]));
    most = std::max(most, maxDifference(a.values[l], b.values[l]));
  }
  return most;
}

} // namespace moe::testing

#endif // MOE_TESTS_UNIT_CUDA_ENGINECOMPARISON_H
