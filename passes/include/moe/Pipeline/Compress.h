//===- Compress.h - Checkpoint to package in one call -----------*- C++ -*-===//
//
// Part of moec. What `moec compress` does, as a library the CLI and tests
// call: import -> (calibrate the module as it is whenever the next pass
// needs statistics) -> the recipe's passes (GPTQ sequentially, layer by
// layer) -> emit -> optional evaluation before and after, with a quality
// gate. The CLI only parses options and prints.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PIPELINE_COMPRESS_H
#define MOE_PIPELINE_COMPRESS_H

#include "moe/Pipeline/Recipe.h"

#include "mlir/IR/MLIRContext.h"

#include <nlohmann/json.hpp>

#include <functional>
#include <string>

namespace moe {

struct CompressRequest {
  std::string model;    ///< Hugging Face checkpoint directory.
  std::string recipe;   ///< Recipe file (JSON or YAML), or `preset`.
  std::string output;   ///< Package path (.moepkg).
  std::string evalData; ///< Evaluate before and after on this data, or empty.
  int64_t evalTokens = 0;
  double maxPplIncrease = -1; ///< Percent; < 0: no quality gate.
  int64_t evalSequenceLength = 256;
  /// The report (moe/Pipeline/Report.h): JSON always, beside the package
  /// (<output without .moepkg>.report.json) unless `reportJson` says where;
  /// HTML when `reportHtml` is given.
  std::string reportJson, reportHtml;
  std::string preset;            ///< The name of a preset (Recipe.h) instead of a recipe file.
  std::string calibrationData;   ///< Overrides the recipe's calibration data.
  int64_t calibrationTokens = 0; ///< > 0: overrides the recipe's token count.
  /// Calibration statistics are kept here under a hash of the checkpoint,
  /// the data, the calibration options and the passes before, and reused.
  std::string statsCache;
  /// Keep the work in NAME.work/ beside the package, saved after every pass
  /// and every GPTQ layer; a rerun with the same inputs continues from the
  /// last saved step.
  bool resume = false;
  /// > 0: sequential GPTQ keeps the process's resident memory under this
  /// many bytes: one layer's weights at a time, routed experts loaded on
  /// demand, and a layer's experts' moments gathered and quantised a chunk
  /// at a time (as many experts as fit beside what the run already holds).
  uint64_t maxMemoryBytes = 0;
  /// > 0: sequential GPTQ gathers and quantises at most this many experts
  /// of a layer at a time (as under maxMemoryBytes, which may lower it).
  int64_t expertsPerChunk = 0;
};

struct CompressProgress {
  /// A step begins ("importing ...", "[2/3] moe-quantize{...}").
  std::function<void(const std::string &)> step = [](const std::string &) {};
  /// Sequential GPTQ finished a layer.
  std::function<void(int64_t layer, int64_t layers, double calibrateSeconds, double quantizeSeconds)> layer =
      [](int64_t, int64_t, double, double) {};
};

struct CompressResult {
  /// bytes and expert counts before/after, per-pass records, perplexity
  /// before/after and the gate's verdict when evaluated.
  nlohmann::json summary;
  bool qualityGateFailed = false;
  std::string qualityGateReason;
  nlohmann::json report;
};

/// Runs the whole job. Work files live in a temporary directory under
/// TMPDIR, removed on return and on SIGINT/SIGTERM. The package is written
/// atomically; nothing is written when any step fails.
Expected<CompressResult> compressCheckpoint(const CompressRequest &request, const CompressProgress &progress,
                                            mlir::MLIRContext &context);

} // namespace moe

#endif // MOE_PIPELINE_COMPRESS_H
