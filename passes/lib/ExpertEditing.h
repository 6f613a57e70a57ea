//===- ExpertEditing.h - Removing experts from a moe_block ------*- C++ -*-===//
//
// Part of moec. Internal to the passes.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_EXPERTEDITING_H
#define MOE_PASSES_LIB_EXPERTEDITING_H

#include "moe/Lowering/TensorAccess.h"

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

/// The tensor behind `symbol` as f32 (FP8 with its `_scale_inv` block
/// scales applied); `dtype` receives the stored dtype.
mlir::FailureOr<std::vector<float>> readF32(ir::ModelOp model, TensorAccess &access, mlir::FlatSymbolRefAttr symbol,
                                            DType &dtype);

/// Appends `values` (shape `shape`) to the WeightStore as `name` in
/// `dtype` (bf16, f16 or f32; anything else is stored as bf16), adds or
/// replaces its moe.tensor op next to `like`, and returns its symbol.
mlir::FailureOr<mlir::FlatSymbolRefAttr> writeTensor(ir::ModelOp model, TensorAccess &access, ir::TensorOp like,
                                                     llvm::StringRef name, llvm::ArrayRef<int64_t> shape,
                                                     const std::vector<float> &values, DType dtype);

/// Keeps entries `keep` of dimension `dim` (0: rows, 1: columns) of the
/// matrix behind `symbol`, written to the WeightStore as
/// `<symbol><suffix>`: the stored bytes are copied exactly, except FP8 with
/// block scales, which is dequantised and stored as bf16.
mlir::FailureOr<mlir::FlatSymbolRefAttr> selectSlices(ir::ModelOp model, TensorAccess &access,
                                                      mlir::FlatSymbolRefAttr symbol, llvm::ArrayRef<int64_t> keep,
                                                      int dim, llvm::StringRef suffix);

/// Appends a tensor to the WeightStore under `name`, or, when the store
/// already holds different contents under that name (another pipeline run
/// on the same store), under `name.v2`, `name.v3`, ...: a module written
/// earlier keeps the weights it was written with. Returns the key used.
mlir::FailureOr<std::string> appendToStore(ir::ModelOp model, TensorAccess &access, const std::string &name,
                                           DType dtype, llvm::ArrayRef<int64_t> shape, std::span<const uint8_t> bytes);

/// The moe.tensor op of `symbol`.
ir::TensorOp lookupTensor(ir::ModelOp model, mlir::FlatSymbolRefAttr symbol);

/// Removes experts `drop` of `layer`: slices the router (and correction
/// bias), renumbers the remaining experts in order, falls back from
/// group-limited to plain top-k when groups shrink unevenly (with a remark),
/// erases tensors nothing references any more. Errors name `passName`.
mlir::LogicalResult dropExperts(ir::ModelOp model, ir::LayerOp layer, const std::set<int64_t> &drop,
                                TensorAccess &access, llvm::StringRef passName, DropCounts &counts);

/// Gives `expert` the id `id`, remembering the id it was imported with
/// (`origin`) so reports can still name it.
void renumberExpert(ir::ExpertOp expert, int64_t id);

/// Erases tensors no op references, with their FP8 `_scale_inv` siblings.
void eraseUnusedTensors(ir::ModelOp model);

/// Fails (naming `passName`) when an expert of `model` is split into parts
/// (moe-allocate-bits granularity=micro-expert) or factored
/// (moe-factor-experts): passes that select, merge or slice experts run
/// before either.
mlir::LogicalResult refuseSplitExperts(ir::ModelOp model, llvm::StringRef passName);

} // namespace moe

#endif // MOE_PASSES_LIB_EXPERTEDITING_H
