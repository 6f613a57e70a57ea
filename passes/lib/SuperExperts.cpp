//===- SuperExperts.cpp - The Super Experts rule --------------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "SuperExperts.h"
#include "LayerLoader.h"
#include "PassSupport.h"
#include "StatisticsReader.h"
#include "moe/Calibration/StatisticNames.h"

#include <algorithm>
#include <cmath>

namespace moe {

std::set<std::pair<int64_t, int64_t>> superExpertRule(const std::vector<ExpertMaximum> &maxima, int64_t numLayers) {
  // round() of Python 3: halves go to the even integer (the default
  // floating-point rounding mode).
  const int64_t included = static_cast<int64_t>(std::nearbyint(0.75 * static_cast<double>(numLayers)));
  std::vector<ExpertMaximum> pool;
  for (const ExpertMaximum &maximum : maxima)
    if (maximum.layer < included)
      pool.push_back(maximum);
  std::set<std::pair<int64_t, int64_t>> found;
  if (pool.empty())
    return found;
  std::vector<double> sorted;
  for (const ExpertMaximum &maximum : pool)
    sorted.push_back(maximum.value);
  std::sort(sorted.begin(), sorted.end());
  // numpy.percentile(values, 99.5), method "linear".
  const double position = 0.995 * static_cast<double>(sorted.size() - 1);
  const size_t below = static_cast<size_t>(std::floor(position));
  const size_t above = std::min(below + 1, sorted.size() - 1);
  const double percentile = sorted[below] + (position - static_cast<double>(below)) * (sorted[above] - sorted[below]);
  // The released code compares with np.max(values) // 10: floor division.
  const double tenth = std::floor(sorted.back() / 10.0);
  for (const ExpertMaximum &maximum : pool)
    if (maximum.value > percentile && maximum.value > tenth)
      found.insert({maximum.layer, maximum.expert});
  return found;
}

mlir::FailureOr<std::set<std::pair<int64_t, int64_t>>> findSuperExperts(const StatisticsReader &file, ir::ModelOp model,
                                                                        llvm::StringRef pass) {
  std::vector<ExpertMaximum> maxima;
  int64_t numLayers = 0;
  for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
    ++numLayers;
    BlockParts parts = blockParts(layer);
    if (!parts.block)
      continue;
    const int64_t index = static_cast<int64_t>(layer.getIndex());
    mlir::FailureOr<std::vector<double>> outputs = file.layer(index, stats::kMaxAbsOutput, layer);
    if (failed(outputs))
      return mlir::failure();
    for (ir::ExpertOp expert : parts.experts) {
      if (expert.getPartOffset().value_or(0) != 0)
        continue; // a later part of an expert split by width: counted once
      const int64_t id = static_cast<int64_t>(expert.getId());
      if (id >= static_cast<int64_t>(outputs->size())) {
        passError(expert, pass) << "the statistics have " << outputs->size() << " experts for layer " << index
                                << "; calibrate the model as it is now";
        return mlir::failure();
      }
      maxima.push_back({index, id, (*outputs)[static_cast<size_t>(id)]});
    }
    if (file.has(index, stats::kSharedMaxAbsOutput)) {
      mlir::FailureOr<std::vector<double>> shared = file.layer(index, stats::kSharedMaxAbsOutput, layer);
      if (failed(shared))
        return mlir::failure();
      if (shared->size() != 1) {
        passError(layer, pass) << file.path() << ": layers." << index << "." << stats::kSharedMaxAbsOutput
                               << " must hold one value, it holds " << shared->size();
        return mlir::failure();
      }
      maxima.push_back({index, -1, shared->front()});
    }
  }
  std::set<std::pair<int64_t, int64_t>> routed;
  for (const std::pair<int64_t, int64_t> &found : superExpertRule(maxima, numLayers))
    if (found.second >= 0)
      routed.insert(found);
  return routed;
}

} // namespace moe
