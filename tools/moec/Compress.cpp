//===- Compress.cpp - moec compress: checkpoint to package in one command -===//
//
// Part of moec. Options, progress on the terminal and the JSON summary; the
// job itself is the pipeline library's (moe/Pipeline/Compress.h). A failed
// quality gate (--max-ppl-increase) exits with code 3 and a one-line reason.
//
//===----------------------------------------------------------------------===//

#include "Commands.h"

#include "moe/Pipeline/Compress.h"
#include "moe/Support/AtomicFile.h"
#include "moe/Support/ByteSize.h"
#include "moe/Support/Distributed.h"
#include "moe/Support/Progress.h"
#include "moe/Transforms/Passes.h"

#include <chrono>
#include <cstdio>
#include <iostream>
#include <unistd.h>

namespace moe::cli {
namespace {

/// Exit code of a failed quality gate (distinct from errors, which are 1).
constexpr int kQualityGateFailed = 3;

struct CompressOptions {
  CompressRequest request;
  std::string summary, maxMemory;
};

int runCompress(CompressOptions &options) {
  registerPassesOnce();
  if (!options.maxMemory.empty()) {
    std::optional<double> bytes = parseByteSize(options.maxMemory);
    if (!bytes || *bytes < 1) {
      printError("--max-memory '" + options.maxMemory + "': expected a size such as 16G or 512M");
      return 1;
    }
    options.request.maxMemoryBytes = static_cast<uint64_t>(*bytes);
  }
  const auto start = std::chrono::steady_clock::now();
  const bool terminal = isatty(STDERR_FILENO);
  const bool quiet = progressMode() == ProgressMode::Never;
  CompressProgress progress;
  progress.step = [&](const std::string &message) {
    if (quiet)
      return;
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::fprintf(stderr, "%s[%6.1f s] %s%s\n", terminal ? "\033[1m" : "", elapsed, message.c_str(),
                 terminal ? "\033[0m" : "");
  };
  // Sequential GPTQ's layers show in calibration's progress line (rate and
  // ETA per layer); per-layer seconds are in the summary.
  mlir::MLIRContext context;
  Expected<CompressResult> result = compressCheckpoint(options.request, progress, context);
  if (!result) {
    printError(result.status().message());
    return 1;
  }
  if (distributed::rank() != 0 && !distributed::simulated())
    return 0; // rank 0 prints and writes for the job
  const std::string text = result->summary.dump(2) + "\n";
  std::cout << text;
  if (!options.summary.empty()) {
    Status written = writeTextAtomically(options.summary, text);
    if (!written.ok()) {
      printError(written.message());
      return 1;
    }
  }
  if (result->qualityGateFailed) {
    std::fprintf(stderr, "moec: %s\n", result->qualityGateReason.c_str());
    return kQualityGateFailed;
  }
  return 0;
}

} // namespace

Command registerCompress(CLI::App &app) {
  auto options = std::make_shared<CompressOptions>();
  CLI::App *command = app.add_subcommand(
      "compress", "Checkpoint -> calibrate -> recipe passes -> package, in one command (JSON summary on stdout)");
  command->add_option("model", options->request.model, "Hugging Face checkpoint directory")->required();
  CLI::Option *recipe = command->add_option("--recipe", options->request.recipe,
                                            "Recipe (JSON, or YAML ending in .yaml): passes with options, calibration");
  command
      ->add_option("--preset", options->request.preset,
                   "A recipe that ships with moec: q8, q4, q4-gptq, q3-mixed, prune25-q4, merge-q4 (moec passes lists "
                   "them)")
      ->excludes(recipe);
  command->add_option("--calib-data", options->request.calibrationData,
                      "Calibration data (text, .jsonl, .u32); overrides the recipe's");
  command->add_flag("--resume", options->request.resume,
                    "Keep the work beside the package (NAME.work/), saved after every pass and GPTQ layer; run the "
                    "same command again to continue a killed run from its last saved step");
  command->add_option("--stats-cache", options->request.statsCache,
                      "Keep calibration statistics in this directory, keyed by a hash of the checkpoint, data, "
                      "options and earlier passes, and reuse them (a second recipe on the same model does not "
                      "calibrate again)");
  command
      ->add_option("--calib-tokens", options->request.calibrationTokens, "Calibration tokens; overrides the recipe's")
      ->check(CLI::PositiveNumber);
  command->add_option("-o,--output", options->request.output, "Output package (.moepkg)")->required();
  command->add_option("--eval-data", options->request.evalData,
                      "Evaluate before and after on this data (text, .jsonl, .u32)");
  command->add_option("--eval-tokens", options->request.evalTokens, "Stop evaluation after this many tokens per domain")
      ->check(CLI::NonNegativeNumber);
  command
      ->add_option("--max-ppl-increase", options->request.maxPplIncrease,
                   "Fail (exit code 3) when perplexity on --eval-data rises by more than this many percent")
      ->check(CLI::NonNegativeNumber);
  command->add_option("--summary", options->summary, "Also write the JSON summary to this file");
  command->add_option("--report", options->request.reportHtml,
                      "Write the HTML report here: per layer and expert what was kept, pruned or merged and why, "
                      "routing, widths, formats, bits and bytes, perplexity and KL divergence before and after");
  command->add_option("--report-json", options->request.reportJson,
                      "Where the JSON report goes (default: beside the package, NAME.report.json)");
  command->add_option("--max-memory", options->maxMemory,
                      "Keep resident memory under this size (16G, 512M): every engine holds one layer at a time; "
                      "sequential GPTQ loads routed experts on demand and gathers and quantises a layer's experts a "
                      "chunk at a time (the same package, byte for byte)");
  command
      ->add_option("--experts-per-chunk", options->request.expertsPerChunk,
                   "Sequential GPTQ gathers and quantises at most this many of a layer's experts at a time (loaded "
                   "on demand, as under --max-memory)")
      ->check(CLI::PositiveNumber);
  command->add_option("--seq-len", options->request.evalSequenceLength, "Evaluation window length")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  return {command, [options] { return runCompress(*options); }};
}

} // namespace moe::cli
