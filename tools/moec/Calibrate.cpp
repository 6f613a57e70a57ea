//===- Calibrate.cpp - moec calibrate: statistics for compression ---------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Commands.h"

#include "moe/Support/Process.h"

#include "moe/Calibration/Statistics.h"
#include "moe/Runtime/Model.h"

#include <cstdio>
#include <sys/resource.h>

namespace moe::cli {

namespace {

struct CalibrateOptions {
  ModelOptions model;
  std::string data, output;
  int64_t tokens = 0, sequenceLength = 256;
  bool inputMoments = false, allExperts = false, gradients = false;
  double sampleCapRatio = 0;
  int64_t blockSamples = 0;
};

int runCalibrate(const CalibrateOptions &options) {
  Expected<ModelAndData> opened = openModelAndData(options.model, options.data);
  if (!opened) {
    printError(opened.status().message());
    return 1;
  }
  LoadedModel &model = opened->model;
  const std::vector<EvalStream> &streams = opened->streams;
  CalibrationOptions calibration;
  calibration.sequenceLength = options.sequenceLength;
  calibration.maxTokens = options.tokens;
  calibration.inputMoments = options.inputMoments;
  calibration.allExperts = options.allExperts;
  calibration.sampleCapRatio = options.sampleCapRatio;
  calibration.blockSamples = options.blockSamples;
  calibration.gradients = options.gradients;
  Expected<CalibrationResult> result = calibrate(*model.engine, streams, calibration);
  if (!result) {
    printError(result.status().message());
    return 1;
  }
  Status status = writeStatistics(*result, calibration, options.output);
  if (!status.ok()) {
    printError(status.message());
    return 1;
  }
  std::printf("calibrated %lld tokens through %zu MoE layers in %.1f s -> %s\n", static_cast<long long>(result->tokens),
              result->layers.size(), result->seconds, options.output.c_str());
  if (options.gradients)
    std::printf("backward pass: mean next-token loss %.4f over %lld windows\n", result->gradientLoss,
                static_cast<long long>(result->tokens / options.sequenceLength));
  const LayerCache &cache = model.engine->layerCache();
  std::printf(
      "memory: peak RSS %.1f MB; layer weights resident at most %.1f MB of the model's %.1f MB (%lld layer loads)\n",
      static_cast<double>(peakResidentBytes()) / 1e6, static_cast<double>(cache.peakResidentBytes()) / 1e6,
      static_cast<double>(cache.distinctLayerBytes()) / 1e6, static_cast<long long>(cache.loads()));
  return 0;
}

} // namespace

Command registerCalibrate(CLI::App &app) {
  auto options = std::make_shared<CalibrateOptions>();
  CLI::App *command = app.add_subcommand(
      "calibrate", "Run calibration text through a model and record per-expert statistics (safetensors)");
  addModelOptions(command, options->model);
  command->add_option("--data", options->data, "Calibration data (text, .jsonl or .u32)")->required();
  command->add_option("-o,--output", options->output, "Statistics file (.safetensors)")->required();
  command
      ->add_option("--max-tokens,--tokens", options->tokens,
                   "Stop after this many tokens (default: all; the name eval uses)")
      ->check(CLI::PositiveNumber);
  command->add_option("--seq-len", options->sequenceLength, "Window length")->check(CLI::PositiveNumber);
  command->add_flag("--input-moments", options->inputMoments,
                    "Also record X^T X of each expert's routed inputs (hidden^2 per expert; for GPTQ)");
  command
      ->add_option("--sample-cap-ratio", options->sampleCapRatio,
                   "Cap each expert's moment tokens at this multiple of its average load (EAQuant uses 2)")
      ->check(CLI::NonNegativeNumber);
  command->add_flag("--all-experts", options->allExperts,
                    "Run every expert on every token for its statistics (block output still follows routing)");
  command
      ->add_option("--block-samples", options->blockSamples,
                   "Keep this many block input/output rows per MoE layer (for reconstruction and dynamic skip)")
      ->check(CLI::NonNegativeNumber);
  command->add_flag("--gradients", options->gradients,
                    "Also run the backward pass per window and record each expert neuron's squared loss gradient "
                    "(HEAPr; needs the whole model per window)");
  return {command, [options] { return runCalibrate(*options); }};
}

} // namespace moe::cli
