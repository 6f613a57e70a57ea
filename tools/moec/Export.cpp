//===- Export.cpp - moec export: a moe module as a checkpoint -------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Commands.h"
#include "ModuleFiles.h"

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Exporter/Exporter.h"
#include "moe/Exporter/GgufExport.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Runtime/Package.h"

#include "mlir/IR/BuiltinOps.h"

#include "mlir/IR/MLIRContext.h"
#include "mlir/Parser/Parser.h"
#include "llvm/Support/SourceMgr.h"
#include <filesystem>

namespace moe::cli {
namespace {

struct ExportOptions {
  std::string input;
  std::string format = "hf";
  std::string output;
  bool noExpandMerged = false;
};

void printRemarks(const std::vector<std::string> &remarks) {
  for (const std::string &remark : remarks)
    std::fprintf(stderr, "remark: %s\n", remark.c_str());
}

/// --format gguf: from a module (lowered as the runtime would run it) or a package.
int runGgufExport(const ExportOptions &options) {
  GgufExportOptions gguf;
  gguf.expandMerged = !options.noExpandMerged;
  std::vector<std::string> remarks;
  Status status = Status::success();
  if (isPackagePath(options.input)) {
    Expected<OpenedPackage> package = openPackage(options.input);
    if (!package) {
      printError(package.status().message());
      return 1;
    }
    if (package->extras.tokenizerJson.empty()) {
      printError(options.input + ": the package carries no tokenizer.json, which a GGUF file needs");
      return 1;
    }
    status =
        exportGguf(package->description, GgufAssets{package->extras.tokenizerJson, package->extras.tokenizerConfigJson},
                   options.input, options.output, gguf, remarks);
  } else {
    Expected<ModelDescription> description = readModuleDescription(options.input);
    if (!description) {
      printError(description.status().message());
      return 1;
    }
    Expected<GgufAssets> assets = readGgufAssets(*description);
    status = assets ? exportGguf(*description, *assets, options.input, options.output, gguf, remarks) : assets.status();
  }
  printRemarks(remarks);
  if (!status.ok()) {
    printError(status.message());
    return 1;
  }
  return 0;
}

int runExport(const ExportOptions &options) {
  if (options.format == "gguf")
    return runGgufExport(options);
  if (options.format != "hf" && options.format != "compressed-tensors") {
    printError(
        "--format '" + options.format +
        "': expected hf (a Hugging Face checkpoint), compressed-tensors (vLLM, transformers) or gguf (llama.cpp)");
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
  Status status = exportHuggingFace(*models.begin(), options.output, &remarks,
                                    options.format == "compressed-tensors" ? QuantizedWeights::CompressedTensors
                                                                           : QuantizedWeights::Dequantized);
  if (!status.ok()) {
    printError(status.message());
    return 1;
  }
  printRemarks(remarks);
  return 0;
}

} // namespace

Command registerExport(CLI::App &app) {
  auto options = std::make_shared<ExportOptions>();
  CLI::App *command = app.add_subcommand("export", "Write a moe module as a checkpoint other runtimes load");
  command->add_option("module", options->input, "Input .mlir module (or, for gguf, a .moepkg package)")->required();
  command->add_option("--format", options->format,
                      "Output format: hf or compressed-tensors (a directory), gguf (a file for llama.cpp)");
  command->add_option("-o,--output", options->output, "Output directory (hf, compressed-tensors) or file (gguf)")
      ->required();
  command->add_flag("--no-expand-merged", options->noExpandMerged,
                    "gguf: refuse merged experts instead of writing them into each member's slot");
  return {command, [options] { return runExport(*options); }};
}

} // namespace moe::cli
