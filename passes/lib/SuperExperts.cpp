//===- SuperExperts.cpp - The Super Experts rule --------------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "SuperExperts.h"

#include <algorithm>
#include <cmath>

namespace moe {

std::set<std::pair<int64_t, int64_t>>
findSuperExperts(const std::vector<std::pair<double, std::pair<int64_t, int64_t>>> &maxOutputs) {
  std::set<std::pair<int64_t, int64_t>> found;
  if (maxOutputs.empty())
    return found;
  std::vector<double> sorted;
  for (const auto &entry : maxOutputs)
    sorted.push_back(entry.first);
  std::sort(sorted.begin(), sorted.end());
  double percentile = sorted[static_cast<size_t>(std::floor(0.995 * static_cast<double>(sorted.size() - 1)))];
  double largest = sorted.back();
  for (const auto &[value, where] : maxOutputs)
    if (value > percentile && value > 0.1 * largest)
      found.insert(where);
  if (found.empty() && sorted.size() > 1 && largest > 10.0 * sorted[sorted.size() - 2])
    for (const auto &[value, where] : maxOutputs)
      if (value == largest)
        found.insert(where);
  return found;
}

} // namespace moe
