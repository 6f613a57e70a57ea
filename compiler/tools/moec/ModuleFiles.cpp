//===- ModuleFiles.cpp - Reading and writing moe modules for moec ---------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "ModuleFiles.h"
#include "Commands.h"

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Frontend/Safetensors.h"

#include "mlir/Parser/Parser.h"
#include "llvm/Support/SourceMgr.h"
#include "llvm/Support/raw_ostream.h"

namespace moe::cli {

bool isModuleFile(const std::string &path) {
  return path.size() > 5 && path.compare(path.size() - 5, 5, ".mlir") == 0;
}

mlir::OwningOpRef<mlir::ModuleOp> readModuleFile(const std::string &path, mlir::MLIRContext &context) {
  context.loadDialect<ir::MoeDialect>();
  llvm::SourceMgr sourceManager;
  mlir::SourceMgrDiagnosticHandler diagnostics(sourceManager, &context);
  mlir::OwningOpRef<mlir::ModuleOp> module = mlir::parseSourceFile<mlir::ModuleOp>(path, &context);
  if (!module)
    printError(path + ": cannot parse the module (see the diagnostics above)");
  return module;
}

int writeModuleFile(mlir::ModuleOp module, const std::string &output) {
  std::string text;
  llvm::raw_string_ostream os(text);
  module.print(os);
  os << "\n";
  os.flush();
  if (output == "-") {
    llvm::outs() << text;
    return 0;
  }
  Status status =
      writeFileAtomically(output, std::span<const uint8_t>(reinterpret_cast<const uint8_t *>(text.data()), text.size()));
  if (!status.ok()) {
    printError(status.message());
    return 1;
  }
  return 0;
}

} // namespace moe::cli
