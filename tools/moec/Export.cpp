//===- Export.cpp - moec export: a moe module as a checkpoint -------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Commands.h"
#include "ModuleFiles.h"

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Exporter/Exporter.h"

#include "mlir/IR/BuiltinOps.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/Parser/Parser.h"
#include "llvm/Support/SourceMgr.h"

namespace moe::cli {
namespace {

struct ExportOptions {
  std::string input;
  std::string format = "hf";
  std::string output;
};

int runExport(const ExportOptions &options) {
  if (options.format != "hf") {
    printError("--format '" + options.format + "': only 'hf' (a Hugging Face checkpoint) exists so far");
    return 1;
  }
  mlir::MLIRContext context;
  mlir::OwningOpRef<mlir::ModuleOp> module = readModuleFile(options.input, context);
  if (!module)
    return 1;
  auto models = module->getOps<ir::ModelOp>();
  if (models.empty()) {
    printError(options.input + ": no moe.model in the module");
    return 1;
  }
  std::vector<std::string> remarks;
  Status status = exportHuggingFace(*models.begin(), options.output, &remarks);
  if (!status.ok()) {
    printError(status.message());
    return 1;
  }
  for (const std::string &remark : remarks)
    std::fprintf(stderr, "remark: %s\n", remark.c_str());
  return 0;
}

} // namespace

Command registerExport(CLI::App &app) {
  auto options = std::make_shared<ExportOptions>();
  CLI::App *command = app.add_subcommand("export", "Write a moe module as a checkpoint other runtimes load");
  command->add_option("module", options->input, "Input .mlir module")->required();
  command->add_option("--format", options->format, "Output format: hf");
  command->add_option("-o,--output", options->output, "Output directory")->required();
  return {command, [options] { return runExport(*options); }};
}

} // namespace moe::cli
