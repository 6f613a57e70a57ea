//===- EngineComparison.h - Two engines' outputs compared -------*- C++ -*-===//
//
// Part of moec. What the GPU tests (CudaEngineTest, HostWorkTest) share: a
// model loaded onto the CUDA device, and the largest differences between
// the logits and the KV caches of the engine on a device and the engine on
// the CPU, and the KL divergence of their next-token distributions.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_TESTS_UNIT_CUDA_ENGINECOMPARISON_H
#define MOE_TESTS_UNIT_CUDA_ENGINECOMPARISON_H

#include "moe/Runtime/Device.h"
#include "moe/Runtime/Engine.h"
#include "moe/Runtime/Model.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace moe::testing {

/// The CUDA device, and a model loaded onto it with `options` (their device
/// set to it); `model` holds the error of either (so one check of it checks
/// both).
struct LoadedOnDevice {
  Expected<std::shared_ptr<Device>> device;
  Expected<LoadedModel> model;
};

inline LoadedOnDevice loadOnCuda(const std::string &path, EngineOptions options = {}) {
  Expected<std::shared_ptr<Device>> device = openDevice(DeviceChoice::Cuda);
  if (!device) {
    Status failed = device.status();
    return {std::move(device), std::move(failed)};
  }
  options.device = *device;
  Expected<LoadedModel> model = loadModel(path, options);
  return {std::move(device), std::move(model)};
}

/// The largest |a[i] - b[i]|; infinite where the sizes differ or either
/// value is not a number (std::max would pass a NaN over: logits that are
/// all NaN on both sides would compare as equal).
inline double maxDifference(const std::vector<float> &a, const std::vector<float> &b) {
  double most = a.size() == b.size() ? 0 : INFINITY;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    const double difference = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    if (std::isnan(difference))
      return INFINITY;
    most = std::max(most, difference);
  }
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

/// KL(p || q) in nats, p = softmax(reference) and q = softmax(other):
/// what the other engine's next-token distribution loses; infinite where
/// the sizes differ.
inline double klDivergence(const std::vector<float> &reference, const std::vector<float> &other) {
  if (reference.size() != other.size() || reference.empty())
    return INFINITY;
  const auto logSumExp = [](const std::vector<float> &x) {
    const double most = *std::max_element(x.begin(), x.end());
    double sum = 0;
    for (float v : x)
      sum += std::exp(static_cast<double>(v) - most);
    return most + std::log(sum);
  };
  const double p0 = logSumExp(reference), q0 = logSumExp(other);
  double kl = 0;
  for (size_t i = 0; i < reference.size(); ++i) {
    const double logP = reference[i] - p0, logQ = other[i] - q0;
    kl += std::exp(logP) * (logP - logQ);
  }
  return kl;
}

} // namespace moe::testing

#endif // MOE_TESTS_UNIT_CUDA_ENGINECOMPARISON_H
