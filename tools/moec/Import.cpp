//===- Import.cpp - moec import: a checkpoint as a moe module -------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Commands.h"
#include "ModuleFiles.h"

#include "moe/Dialect/Moe/IR/MoeDialect.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Importer/Importer.h"

#include "mlir/IR/MLIRContext.h"
#include "llvm/Support/raw_ostream.h"

#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>
#include <unistd.h>

namespace moe::cli {
namespace {

/// `path` made absolute (its directory must exist).
std::string absolutePath(const std::string &path) {
  if (!path.empty() && path[0] == '/')
    return path;
  char cwd[4096];
  return getcwd(cwd, sizeof(cwd)) ? std::string(cwd) + "/" + path : path;
}

} // namespace

Expected<mlir::OwningOpRef<mlir::ModuleOp>> importCheckpoint(const std::string &directory, const std::string &store,
                                                             mlir::MLIRContext &context) {
  Expected<ImportedCheckpoint> imported = moe::importCheckpoint(directory, store, context);
  if (!imported)
    return imported.status();
  for (const std::string &warning : imported->warnings)
    printWarning(warning);
  return std::move(imported->module);
}

namespace {

struct ImportOptions {
  std::string directory;
  std::string output;
};

int runImport(const ImportOptions &options) {
  // Tensors that passes write go to a WeightStore beside the module.
  std::string store;
  if (options.output != "-") {
    std::string base = options.output;
    if (base.size() > 5 && base.compare(base.size() - 5, 5, ".mlir") == 0)
      base.resize(base.size() - 5);
    store = absolutePath(base + ".moestore");
  }
  mlir::MLIRContext context;
  Expected<mlir::OwningOpRef<mlir::ModuleOp>> module = importCheckpoint(options.directory, store, context);
  if (!module) {
    printError(module.status().message());
    return 1;
  }
  return writeModuleFile(**module, options.output);
}

} // namespace

Command registerImport(CLI::App &app) {
  auto options = std::make_shared<ImportOptions>();
  CLI::App *command =
      app.add_subcommand("import", "Write the moe dialect module of a checkpoint (weights referenced, not copied)");
  command->add_option("model", options->directory, "Hugging Face checkpoint directory")->required();
  command->add_option("-o,--output", options->output, "Output .mlir file ('-' for stdout)")->required();
  return {command, [options] { return runImport(*options); }};
}

} // namespace moe::cli
