//===- Lowering.h - moe module to the runtime's model description -*- C++ -*-===//
//
// Part of moec. The backend's in-memory target: a module becomes the
// ModelDescription the runtime executes (per-layer expert tables, widths,
// remaps, skip thresholds, tensor sources), so a compressed module is
// evaluated, calibrated and run without writing a checkpoint or package.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_LOWERING_LOWERING_H
#define MOE_LOWERING_LOWERING_H

#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Runtime/Description.h"

#include "mlir/IR/BuiltinOps.h"

#include <string>

namespace moe {

/// Lowers `model`. Relative source and store paths are taken relative to
/// `baseDirectory` (the module file's directory).
Expected<ModelDescription> lowerToDescription(ir::ModelOp model, const std::string &baseDirectory);

/// The model of the first moe.model in `module`, or an error.
Expected<ir::ModelOp> findModel(mlir::ModuleOp module);

} // namespace moe

#endif // MOE_LOWERING_LOWERING_H
