//===- SuperExperts.h - The Super Experts rule ----------------*- C++ -*-===//
//
// Part of moec. Shared by every pass that removes or merges experts.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_SUPEREXPERTS_H
#define MOE_PASSES_LIB_SUPEREXPERTS_H

#include <cstdint>
#include <set>
#include <utility>
#include <vector>

namespace moe {

/// (layer, expert) pairs that are Super Experts: max |output| above the
/// 99.5th percentile of all experts and above a tenth of the largest (Su et
/// al.); with so few experts that the percentile is the maximum itself, the
/// largest is one when it stands 10x above the next.
std::set<std::pair<int64_t, int64_t>>
findSuperExperts(const std::vector<std::pair<double, std::pair<int64_t, int64_t>>> &maxOutputs);

} // namespace moe

#endif // MOE_PASSES_LIB_SUPEREXPERTS_H
