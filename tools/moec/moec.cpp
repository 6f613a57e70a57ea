//===- moec.cpp - The moec command-line driver ----------------------------===//
//
// Part of moec. One binary, one subcommand per job: inspect (and, as the
// compiler grows, import, calibrate, opt, emit, eval, compress).
//
//===----------------------------------------------------------------------===//

#include "Commands.h"

#include "moe/Support/Signals.h"

#include "llvm/Support/WithColor.h"
#include "llvm/Support/raw_ostream.h"

#include <vector>

namespace moe::cli {

void printError(const std::string &message) { llvm::WithColor::error(llvm::errs(), "moec") << message << "\n"; }

void printWarning(const std::string &message) { llvm::WithColor::warning(llvm::errs(), "moec") << message << "\n"; }

} // namespace moe::cli

int main(int argc, char **argv) {
  // Not llvm::InitLLVM: its crash handler can hang after heap corruption
  // (Signals.h); these end the process and clean up on interrupts.
  moe::installSignalHandlers("moec");
  CLI::App app{"moec: a compiler that makes Mixture-of-Experts models small and fast"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moec 0.1.0");

  std::vector<moe::cli::Command> commands = {
      moe::cli::registerInspect(app), moe::cli::registerImport(app),    moe::cli::registerOpt(app),
      moe::cli::registerExport(app),  moe::cli::registerEmit(app),      moe::cli::registerCompress(app),
      moe::cli::registerEval(app),    moe::cli::registerCalibrate(app), moe::cli::registerGenerate(app),
  };

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError &error) {
    return app.exit(error);
  }
  for (moe::cli::Command &command : commands)
    if (command.app->parsed())
      return command.run();
  return 2;
}
