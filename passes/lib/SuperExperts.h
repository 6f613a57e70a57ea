//===- SuperExperts.h - The Super Experts rule ----------------*- C++ -*-===//
//
// Part of moec. Shared by every pass that removes, merges or quantises
// experts.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_SUPEREXPERTS_H
#define MOE_PASSES_LIB_SUPEREXPERTS_H

#include "moe/Dialect/Moe/IR/MoeOps.h"

#include "mlir/Support/LogicalResult.h"

#include <cstdint>
#include <set>
#include <utility>
#include <vector>

namespace moe {

class StatisticsReader;

/// One expert's largest |down_proj output| over the calibration tokens
/// routed to it; `expert` -1 is the layer's shared expert.
struct ExpertMaximum {
  int64_t layer = 0, expert = 0;
  double value = 0;
};

/// Su et al.'s rule as their released code applies it
/// (Super-Experts-Profilling, `_identify_super_experts`): among the experts
/// of the first round(0.75 x numLayers) layers (Python's round, half to
/// even; numLayers counts dense layers too), those whose maximum is above
/// the 99.5th percentile of all of them (linear interpolation, numpy's
/// default) and above floor(largest / 10). Returns (layer, expert) pairs,
/// shared experts as expert -1.
std::set<std::pair<int64_t, int64_t>> superExpertRule(const std::vector<ExpertMaximum> &maxima, int64_t numLayers);

/// The routed Super Experts of `model` (ids as the model and the statistics
/// number them), from `max_abs_output` of every MoE layer and
/// `shared_max_abs_output` where calibration recorded a shared expert.
/// Errors name `pass`.
mlir::FailureOr<std::set<std::pair<int64_t, int64_t>>> findSuperExperts(const StatisticsReader &file, ir::ModelOp model,
                                                                        llvm::StringRef pass);

} // namespace moe

#endif // MOE_PASSES_LIB_SUPEREXPERTS_H
