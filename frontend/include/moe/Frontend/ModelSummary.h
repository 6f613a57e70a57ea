//===- ModelSummary.h - Parameter and byte counts of a model ----*- C++ -*-===//
//
// Part of moec. What `moec inspect` reports: parameters and bytes per role
// group, total and active parameters per token, dtypes and shards. Computed
// from a ModelSpec alone (bytes from the config's dtype) or from the
// tensors of a bound checkpoint (actual dtypes, FP8 scales included).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_FRONTEND_MODELSUMMARY_H
#define MOE_FRONTEND_MODELSUMMARY_H

#include "moe/Frontend/ModelSpec.h"

#include <array>
#include <map>
#include <string>

namespace moe {

class Checkpoint;

struct SizeCount {
  int64_t parameters = 0;
  int64_t bytes = 0;
  int64_t tensors = 0;
};

struct ModelSummary {
  std::array<SizeCount, kNumRoleGroups> groups{};
  int64_t totalParameters = 0;
  /// Parameters one token uses: routed experts count top-k of E.
  int64_t activeParameters = 0;
  int64_t totalBytes = 0;
  /// Keyed by dtype name.
  std::map<std::string, SizeCount> dtypes;
};

/// Counts from `spec` alone; bytes assume the config dtype (FP8 plus F32
/// block scales for linear weights when the spec is FP8 block-scaled).
ModelSummary summarizeFromConfig(const ModelSpec &spec);
/// Counts from the tensors of `checkpoint`, which `spec` was bound to.
ModelSummary summarizeCheckpoint(const ModelSpec &spec, const Checkpoint &checkpoint);

} // namespace moe

#endif // MOE_FRONTEND_MODELSUMMARY_H
