//===- PassSupport.h - What every moe pass shares ---------------*- C++ -*-===//
//
// Part of moec. Internal to the passes: diagnostics that start with the
// pass's flag ("moe-quantize: ..."), the one spelling every pass uses.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_PASSSUPPORT_H
#define MOE_PASSES_LIB_PASSSUPPORT_H

#include "mlir/IR/Diagnostics.h"
#include "mlir/IR/Operation.h"

namespace moe {

/// An error on `op` that names `pass` (its flag, Pass::getArgument()).
inline mlir::InFlightDiagnostic passError(mlir::Operation *op, llvm::StringRef pass) {
  return op->emitError() << pass << ": ";
}

} // namespace moe

#endif // MOE_PASSES_LIB_PASSSUPPORT_H
