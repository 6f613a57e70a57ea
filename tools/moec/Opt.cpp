//===- Opt.cpp - moec opt: run a pass pipeline on a moe module ------------===//
//
// Part of moec. The same textual pipelines as moe-opt, e.g.
//   moec opt model.mlir --pipeline "moe-drop-experts{experts=1:0,3},moe-set-topk{top-k=1}" -o out.mlir
//
//===----------------------------------------------------------------------===//

#include "Commands.h"
#include "ModuleFiles.h"

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Transforms/Passes.h"

#include "mlir/IR/MLIRContext.h"
#include "mlir/Parser/Parser.h"
#include "mlir/Pass/PassManager.h"
#include "mlir/Pass/PassRegistry.h"
#include "mlir/Support/FileUtilities.h"
#include "llvm/Support/SourceMgr.h"
#include "llvm/Support/raw_ostream.h"

namespace moe::cli {
namespace {

struct OptOptions {
  std::string input;
  std::string pipeline;
  std::string output;
};

int runOpt(const OptOptions &options) {
  registerPassesOnce();
  mlir::MLIRContext context;
  mlir::OwningOpRef<mlir::ModuleOp> module = readModuleFile(options.input, context);
  if (!module)
    return 1;
  // The passes are anchored on moe.model: "moe-x{..},moe-y" runs on every
  // moe.model of the module; an explicit "builtin.module(...)" pipeline is
  // taken as written.
  mlir::PassManager manager(&context);
  std::string errors;
  llvm::raw_string_ostream errorStream(errors);
  const std::string text = llvm::StringRef(options.pipeline).trim().str();
  if (llvm::StringRef(text).starts_with("builtin.module(")) {
    mlir::FailureOr<mlir::OpPassManager> parsed = mlir::parsePassPipeline(text, errorStream);
    if (mlir::failed(parsed)) {
      printError("--pipeline '" + options.pipeline + "': " + errorStream.str());
      return 1;
    }
    static_cast<mlir::OpPassManager &>(manager) = *parsed;
  } else if (mlir::failed(mlir::parsePassPipeline(text, manager.nest<ir::ModelOp>(), errorStream))) {
    printError("--pipeline '" + options.pipeline + "': " + errorStream.str());
    return 1;
  }
  if (mlir::failed(manager.run(*module))) {
    printError(options.input + ": the pipeline failed (see the diagnostics above); nothing was written");
    return 1;
  }
  return writeModuleFile(*module, options.output);
}

} // namespace

Command registerOpt(CLI::App &app) {
  auto options = std::make_shared<OptOptions>();
  CLI::App *command = app.add_subcommand("opt", "Run a pass pipeline on a moe module (as moe-opt does)");
  command->add_option("module", options->input, "Input .mlir module")->required();
  command->add_option("--pipeline", options->pipeline, "Textual pass pipeline, e.g. \"moe-set-topk{top-k=1}\"")
      ->required();
  command->add_option("-o,--output", options->output, "Output .mlir module")->required();
  return {command, [options] { return runOpt(*options); }};
}

} // namespace moe::cli
