//===- Importer.h - Checkpoint to moe dialect -------------------*- C++ -*-===//
//
// Part of moec. Builds the `moe` module of a checkpoint from its bound
// ModelSpec: tensor symbols referencing the checkpoint's bytes (never the
// bytes), layers with dense parts, MoE blocks with router, experts and
// shared expert.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_IMPORTER_IMPORTER_H
#define MOE_IMPORTER_IMPORTER_H

#include "moe/Frontend/Checkpoint.h"
#include "moe/Frontend/ModelSpec.h"

#include "mlir/IR/BuiltinOps.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/IR/OwningOpRef.h"

#include <string>
#include <vector>

namespace moe {

/// The module of `checkpoint` (opened from `directory`, bound to `spec`).
/// `configText` is the config.json the spec came from; `storePath`, when
/// not empty, is the WeightStore passes write new tensors to.
Expected<mlir::OwningOpRef<mlir::ModuleOp>> importModel(mlir::MLIRContext &context, const ModelSpec &spec,
                                                        const Checkpoint &checkpoint, const std::string &configText,
                                                        const std::string &storePath = "");

/// A checkpoint directory imported: config.json read and checked, the
/// checkpoint bound to it, the module built and validated through the
/// lowering (the package loader's check), and the binding's warnings.
struct ImportedCheckpoint {
  mlir::OwningOpRef<mlir::ModuleOp> module;
  std::vector<std::string> warnings;
};
Expected<ImportedCheckpoint> importCheckpoint(const std::string &directory, const std::string &storePath,
                                              mlir::MLIRContext &context);

} // namespace moe

#endif // MOE_IMPORTER_IMPORTER_H
