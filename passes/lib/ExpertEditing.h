//===- ExpertEditing.h - Removing experts from a moe_block ------*- C++ -*-===//
//
// Part of moec. Internal to the passes.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_EXPERTEDITING_H
#define MOE_PASSES_LIB_EXPERTEDITING_H

#include "moe/Transforms/TensorAccess.h"

#include <set>

namespace moe {

/// What a removal took away, for pass statistics.
struct DropCounts {
  int64_t experts = 0;
  int64_t parameters = 0;
};

/// Writes rows `keep` (dimension 0) of the tensor behind `symbol` to the
/// WeightStore as `<symbol><suffix>` and returns the new tensor's symbol.
mlir::FailureOr<mlir::FlatSymbolRefAttr> sliceRows(ir::ModelOp model, TensorAccess &access,
                                                   mlir::FlatSymbolRefAttr symbol, llvm::ArrayRef<int64_t> keep,
                                                   llvm::StringRef suffix);

/// Removes experts `drop` of `layer`: slices the router (and correction
/// bias), renumbers the remaining experts in order, falls back from
/// group-limited to plain top-k when groups shrink unevenly (with a remark),
/// erases tensors nothing references any more. Errors name `passName`.
mlir::LogicalResult dropExperts(ir::ModelOp model, ir::LayerOp layer, const std::set<int64_t> &drop,
                                TensorAccess &access, llvm::StringRef passName, DropCounts &counts);

/// Erases tensors no op references, with their FP8 `_scale_inv` siblings.
void eraseUnusedTensors(ir::ModelOp model);

} // namespace moe

#endif // MOE_PASSES_LIB_EXPERTEDITING_H
