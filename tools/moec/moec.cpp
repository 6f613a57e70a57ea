//===- moec.cpp - The moec command-line driver ----------------------------===//
//
// Part of moec. One binary, one subcommand per job: inspect (and, as the
// compiler grows, import, calibrate, opt, emit, eval, compress).
//
//===----------------------------------------------------------------------===//

#include "Commands.h"
#include "moe/Support/Distributed.h"

#include "moe/Transforms/Passes.h"

#include "moe/Support/Progress.h"
#include "moe/Support/Signals.h"
#include "moe/Support/Threads.h"

#include "llvm/Support/WithColor.h"
#include "llvm/Support/raw_ostream.h"

#include <vector>

namespace moe::cli {

void registerPassesOnce() {
  static const bool registered = [] {
    registerMoePasses();
    return true;
  }();
  (void)registered;
}

void printError(const std::string &message) { llvm::WithColor::error(llvm::errs(), "moec") << message << "\n"; }

void printWarning(const std::string &message) { llvm::WithColor::warning(llvm::errs(), "moec") << message << "\n"; }

} // namespace moe::cli

int main(int argc, char **argv) {
  // Not llvm::InitLLVM: its crash handler can hang after heap corruption
  // (Signals.h); these end the process and clean up on interrupts.
  moe::installSignalHandlers("moec");
  // Under mpirun, one rank of a distributed job (Distributed.h).
  if (moe::Status joined = moe::distributed::initialize(&argc, &argv); !joined.ok()) {
    moe::cli::printError(joined.message());
    return 1;
  }
  CLI::App app{"moec: a compiler that makes Mixture-of-Experts models small and fast"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "moec 0.1.0");
  // Options every command takes, before or after the command's name.
  app.fallthrough();
  app.option_defaults()->always_capture_default(); // --help shows each option's default
  unsigned threads = 0;
  bool progress = false, quiet = false;
  app.add_option("--threads", threads, "Threads to compute with (default: every core)")->check(CLI::PositiveNumber);
  app.add_flag("--progress", progress, "Progress lines with rate and ETA on stderr even when it is not a terminal");
  app.add_flag("-q,--quiet", quiet, "No progress lines or step messages (errors and warnings still print)");

  std::vector<moe::cli::Command> commands = {
      moe::cli::registerInspect(app), moe::cli::registerImport(app),    moe::cli::registerOpt(app),
      moe::cli::registerExport(app),  moe::cli::registerEmit(app),      moe::cli::registerCompress(app),
      moe::cli::registerEval(app),    moe::cli::registerCalibrate(app), moe::cli::registerGenerate(app),
      moe::cli::registerReport(app),  moe::cli::registerPasses(app),    moe::cli::registerAnalyze(app),
      moe::cli::registerSearch(app),
  };

  // A mistyped command gets the nearest one.
  if (argc > 1 && argv[1][0] != '-') {
    const std::string word = argv[1];
    std::string best;
    unsigned bestDistance = ~0u;
    bool known = false;
    for (const moe::cli::Command &command : commands) {
      const std::string name = command.app->get_name();
      known |= name == word;
      const unsigned distance = llvm::StringRef(name).edit_distance(word);
      if (distance < bestDistance) {
        bestDistance = distance;
        best = name;
      }
    }
    if (!known) {
      std::string message = "'" + word + "' is not a moec command";
      if (bestDistance <= std::max<size_t>(2, word.size() / 3))
        message += "; did you mean '" + best + "'?";
      moe::cli::printError(message + " (moec --help lists them)");
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError &error) {
    return app.exit(error);
  }
  if (progress && quiet) {
    moe::cli::printError("--progress and --quiet contradict each other; give one");
    return 2;
  }
  moe::setProgressMode(quiet      ? moe::ProgressMode::Never
                       : progress ? moe::ProgressMode::Always
                                  : moe::ProgressMode::Auto);
  moe::setThreadCount(threads);
  for (moe::cli::Command &command : commands)
    if (command.app->parsed()) {
      if (moe::distributed::size() == 1) {
        const int code = command.run();
        moe::distributed::finalize(); // (mpirun -n 1)
        return code;
      }
      // A distributed job: compress spreads its GPTQ over the ranks; rank 0
      // alone prints and writes. A rank that fails ends every rank, so no
      // output is left half made.
      if (command.app->get_name() != "compress") {
        if (moe::distributed::simulated())
          moe::cli::printError("MOEC_BENCH_RANK stands in for one rank of moec compress only, not " +
                               command.app->get_name());
        else if (moe::distributed::rank() == 0)
          moe::cli::printError("only moec compress runs under mpirun (its GPTQ spread over the ranks), not " +
                               command.app->get_name());
        moe::distributed::abortJob(2);
      }
      if (moe::distributed::rank() != 0 && !moe::distributed::simulated())
        moe::setProgressMode(moe::ProgressMode::Never);
      const int code = command.run();
      // Rank 0's failed quality gate (3) comes after everything is written.
      if (code != 0 && !(code == 3 && moe::distributed::rank() == 0)) {
        std::fprintf(stderr, "moec: rank %d of %d failed (exit %d); ending the job\n", moe::distributed::rank(),
                     moe::distributed::size(), code);
        moe::distributed::abortJob(code);
      }
      moe::distributed::finalize();
      return code;
    }
  return 2;
}
