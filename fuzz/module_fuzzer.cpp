//===- module_fuzzer.cpp - libFuzzer: module parser, verifier, lowering ---===//
//
// Part of moec. Parses the input as a moe dialect module; a module that
// parses and verifies is lowered to the runtime's model description (which
// validates it against its config). None of it may crash; a lowered
// description must satisfy validateDescription.
//
//===----------------------------------------------------------------------===//

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Runtime/Description.h"

#include "mlir/IR/Diagnostics.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/IR/Verifier.h"
#include "mlir/Parser/Parser.h"

#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static mlir::MLIRContext *context = [] {
    auto *created = new mlir::MLIRContext(mlir::MLIRContext::Threading::DISABLED);
    created->loadDialect<moe::ir::MoeDialect>();
    // Diagnostics are expected; keep the fuzzer's output quiet.
    created->getDiagEngine().registerHandler([](mlir::Diagnostic &) { return mlir::success(); });
    return created;
  }();
  // MLIR's lexer reads up to a terminating NUL, as files and strings have.
  const std::string text(reinterpret_cast<const char *>(data), size);
  mlir::OwningOpRef<mlir::ModuleOp> module = mlir::parseSourceString<mlir::ModuleOp>(text, context);
  if (!module || mlir::failed(mlir::verify(*module)))
    return 0;
  moe::Expected<moe::ir::ModelOp> model = moe::findModel(*module);
  if (!model)
    return 0;
  moe::Expected<moe::ModelDescription> description = moe::lowerToDescription(*model, "");
  if (description && !moe::validateDescription(*description, "fuzz").ok())
    std::abort(); // the lowering returned a description its own check rejects
  return 0;
}
