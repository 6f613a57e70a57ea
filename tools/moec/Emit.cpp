//===- Emit.cpp - moec emit: a moe module as a .moepkg package ------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Commands.h"
#include "ModuleFiles.h"

#include "moe/Lowering/Emit.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Runtime/Package.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>

namespace moe::cli {
namespace {

struct EmitOptions {
  std::string input;
  std::string output;
};

int runEmit(const EmitOptions &options) {
  if (!isPackagePath(options.output)) {
    printError("-o '" + options.output + "': a package file name ends in .moepkg");
    return 1;
  }
  mlir::MLIRContext context;
  mlir::OwningOpRef<mlir::ModuleOp> module = readModuleFile(options.input, context);
  if (!module)
    return 1;
  Expected<ir::ModelOp> model = findModel(*module);
  if (!model) {
    printError(options.input + ": " + model.status().message());
    return 1;
  }
  nlohmann::json provenance = {{"tool", "moec emit"}, {"module", options.input}};
  Status status = emitPackage(*model, std::filesystem::path(options.input).parent_path().string(), options.output,
                              provenance.dump());
  if (!status.ok()) {
    printError(status.message());
    return 1;
  }
  std::printf("wrote %s (%llu bytes)\n", options.output.c_str(),
              static_cast<unsigned long long>(std::filesystem::file_size(options.output)));
  return 0;
}

} // namespace

Command registerEmit(CLI::App &app) {
  auto options = std::make_shared<EmitOptions>();
  CLI::App *command = app.add_subcommand("emit", "Write a moe module as a runtime package (.moepkg)");
  command->add_option("module", options->input, "Input .mlir module")->required();
  command->add_option("-o,--output", options->output, "Output package (.moepkg)")->required();
  return {command, [options] { return runEmit(*options); }};
}

} // namespace moe::cli
