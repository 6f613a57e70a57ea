//===- moe-opt.cpp - Runs passes on moe dialect modules -------------------===//
//
// Part of moec. MLIR's usual driver (--mlir-print-ir-after-all,
// --mlir-pass-statistics, -verify-diagnostics, -split-input-file) with the moe
// dialect and its passes registered.
//
//===----------------------------------------------------------------------===//

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Transforms/Passes.h"

#include "mlir/IR/DialectRegistry.h"
#include "mlir/Tools/mlir-opt/MlirOptMain.h"
#include "mlir/Transforms/Passes.h"

int main(int argc, char **argv) {
  mlir::registerCanonicalizerPass();
  mlir::registerCSEPass();
  mlir::registerSymbolDCEPass();
  moe::registerMoePasses();
  mlir::DialectRegistry registry;
  registry.insert<moe::ir::MoeDialect>();
  return mlir::asMainReturnCode(
      mlir::MlirOptMain(argc, argv, "moe-opt: passes over the moe dialect\n", registry));
}
