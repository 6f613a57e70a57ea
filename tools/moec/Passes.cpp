//===- Passes.cpp - moec passes: the passes, their options and presets ----===//
//
// Part of moec. What a recipe or a --pipeline may name: every pass with its
// summary, its options (type, default, help) and the pass as text with every
// option at its default; then the presets of `moec compress --preset`.
//
//===----------------------------------------------------------------------===//

#include "Commands.h"

#include "moe/Pipeline/Recipe.h"
#include "moe/Transforms/Passes.h"

#include "mlir/Pass/PassRegistry.h"
#include "llvm/Support/raw_ostream.h"

#include "llvm/Support/raw_ostream.h"
#include <algorithm>
#include <cstring>

namespace moe::cli {
namespace {

struct PassesOptions {
  std::string name;
};

int runPasses(const PassesOptions &options) {
  registerPassesOnce();
  const std::vector<std::string> names = recipePassNames();
  if (!options.name.empty() && std::find(names.begin(), names.end(), options.name) == names.end()) {
    printError("'" + options.name + "' is not a moec pass" + didYouMean(options.name, names));
    return 1;
  }
  for (const std::string &name : names) {
    if (!options.name.empty() && name != options.name)
      continue;
    const mlir::PassInfo *info = mlir::PassInfo::lookup(name);
    if (!info)
      continue;
    // MLIR's own help: the pass, then each option with its type and help.
    info->printHelpStr(0, 34);
    llvm::outs() << "  with defaults: " << passDefaults(name) << "\n\n";
  }
  if (options.name.empty()) {
    llvm::outs() << "presets (moec compress --preset NAME; calibration data from --calib-data):\n";
    for (const Preset &preset : presets())
      llvm::outs() << "  " << preset.name << std::string(12 - std::min<size_t>(11, std::strlen(preset.name)), ' ')
                   << preset.description << "\n";
  }
  return 0;
}

} // namespace

Command registerPasses(CLI::App &app) {
  auto options = std::make_shared<PassesOptions>();
  CLI::App *command =
      app.add_subcommand("passes", "List the passes a recipe or --pipeline may name, with their options and "
                                   "defaults, and the presets of moec compress");
  command->add_option("pass", options->name, "Show only this pass");
  return {command, [options] { return runPasses(*options); }};
}

} // namespace moe::cli
