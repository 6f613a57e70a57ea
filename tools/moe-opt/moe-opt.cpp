//===- moe-opt.cpp - Runs passes on moe dialect modules -------------------===//
//
// Part of moec. MLIR's usual driver (--mlir-print-ir-after-all,
// --mlir-pass-statistics, -verify-diagnostics, -split-input-file) with the moe
// dialect and its passes registered. The file handling of MlirOptMain is
// spelled out here because MlirOptMain(argc, argv, ...) installs LLVM's
// crash handler (llvm::InitLLVM), which can hang after heap corruption;
// moe-opt keeps moec's (moe/Support/Signals.h).
//
//===----------------------------------------------------------------------===//

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Support/Signals.h"
#include "moe/Transforms/Passes.h"

#include "mlir/IR/DialectRegistry.h"
#include "mlir/Support/FileUtilities.h"
#include "mlir/Tools/mlir-opt/MlirOptMain.h"
#include "mlir/Transforms/Passes.h"
#include "llvm/Support/MemoryBuffer.h"
#include "llvm/Support/ToolOutputFile.h"
#include "llvm/Support/raw_ostream.h"

int main(int argc, char **argv) {
  moe::installSignalHandlers("moe-opt");
  mlir::registerCanonicalizerPass();
  mlir::registerCSEPass();
  mlir::registerSymbolDCEPass();
  moe::registerMoePasses();
  mlir::DialectRegistry registry;
  registry.insert<moe::ir::MoeDialect>();
  auto [inputFilename, outputFilename] =
      mlir::registerAndParseCLIOptions(argc, argv, "moe-opt: passes over the moe dialect\n", registry);
  mlir::MlirOptMainConfig config = mlir::MlirOptMainConfig::createFromCLOptions();
  std::string errorMessage;
  std::unique_ptr<llvm::MemoryBuffer> input = mlir::openInputFile(inputFilename, &errorMessage);
  if (!input) {
    llvm::errs() << "moe-opt: " << errorMessage << "\n";
    return 1;
  }
  std::unique_ptr<llvm::ToolOutputFile> output = mlir::openOutputFile(outputFilename, &errorMessage);
  if (!output) {
    llvm::errs() << "moe-opt: " << errorMessage << "\n";
    return 1;
  }
  if (mlir::failed(mlir::MlirOptMain(output->os(), std::move(input), registry, config)))
    return 1;
  output->keep();
  return 0;
}
