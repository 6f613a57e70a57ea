//===- Commands.h - The subcommands of moec ---------------------*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOEC_TOOLS_MOEC_COMMANDS_H
#define MOEC_TOOLS_MOEC_COMMANDS_H

#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Model.h"
#include "moe/Support/Process.h"

#include "mlir/IR/BuiltinOps.h"
#include "mlir/IR/MLIRContext.h"
#include "mlir/IR/OwningOpRef.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <functional>
#include <map>
#include <span>

namespace moe::cli {

/// A registered subcommand: run() returns the process exit code.
using CommandRunner = std::function<int()>;

/// A subcommand and what runs it once it is chosen.
struct Command {
  CLI::App *app;
  CommandRunner run;
};

/// The model argument and --max-memory, shared by the commands that run a model.
struct ModelOptions {
  std::string path;
  std::string maxMemory;
  bool simulateQuantized = false;
  std::string expertCache;             ///< --expert-cache SIZE: offload routed experts.
  std::string expertPolicy = "lru";    ///< --expert-policy lru|frequency.
  std::string expertFallback;          ///< --expert-fallback FORMAT (HOBBIT's low-bit copies).
  double expertFallbackBelow = 0.5;    ///< --expert-fallback-below SHARE.
  std::string task;                    ///< --task NAME|auto|all (task expert sets).
  std::string taskSignature = "first"; ///< --task-signature first|all.
  std::string device;                  ///< --device cpu|cuda|auto (empty: $MOEC_DEVICE, else deviceDefault).
  /// auto for eval and generate; cpu where statistics are made (calibrate,
  /// analyze, search), so they do not depend on the machine.
  std::string deviceDefault = "cpu";
};
/// --task auto (or no --task) on a model with task sets: retrieves a set
/// for each request (eval's windows, generate's prompt) from its first
/// `promptTokens` tokens, and counts the choices.
struct TaskRetrieval {
  bool active = false;
  int64_t promptTokens = 64;
  TaskSignatureScope scope = TaskSignatureScope::FirstLayer;
  std::map<std::string, int64_t> chosen;
  Status choose(LoadedModel &model, std::span<const int32_t> request);
};
TaskRetrieval taskRetrieval(const ModelOptions &options, const LoadedModel &model);
void addModelOptions(CLI::App *command, ModelOptions &options);
/// Opens the model (printing its warnings); errors name the file or option.
Expected<LoadedModel> openModel(const ModelOptions &options);
/// The model and the data read with its tokenizer (readEvalData).
struct ModelAndData {
  LoadedModel model;
  std::vector<EvalStream> streams;
};
Expected<ModelAndData> openModelAndData(const ModelOptions &options, const std::string &data);

/// `moec inspect <dir|config.json> [--json] [--config-only]`.
Command registerInspect(CLI::App &app);

/// Imports the checkpoint in `directory` (warnings printed); passes write
/// tensors to the WeightStore at `store`.
Expected<mlir::OwningOpRef<mlir::ModuleOp>> importCheckpoint(const std::string &directory, const std::string &store,
                                                             mlir::MLIRContext &context);

/// `moec import <dir> -o model.mlir`.
Command registerImport(CLI::App &app);
/// `moec export model.mlir --format hf -o dir`.
Command registerExport(CLI::App &app);
/// `moec compress <dir> --recipe R -o out.moepkg`.
Command registerCompress(CLI::App &app);
/// `moec emit model.mlir -o out.moepkg`.
Command registerEmit(CLI::App &app);
/// `moec opt model.mlir --pipeline P -o out.mlir`.
Command registerOpt(CLI::App &app);
/// `moec calibrate <model> --data F -o stats.safetensors`.
Command registerCalibrate(CLI::App &app);
/// `moec eval <model> --data F [--seq-len L] [--stride S] [--json]`.
Command registerEval(CLI::App &app);
/// `moec generate <model> --prompt TEXT [-n N] [--temperature T --seed S]`.
Command registerGenerate(CLI::App &app);

/// The report of a module, package or GGUF file moec wrote (what `moec
/// report` prints); errors name the file.
Expected<nlohmann::json> compiledModelReport(const std::string &path);

/// `moec analyze <model> --data F [-o report.html]`: routing consistency.
Command registerAnalyze(CLI::App &app);

/// `moec search <model> --data F --ratio R -o recipe.json`: EEP's search.
Command registerSearch(CLI::App &app);

/// `moec passes [PASS]`: passes, options, defaults; presets.
Command registerPasses(CLI::App &app);
/// `moec report model.mlir|pkg [-o report.html] [--json report.json]`.
Command registerReport(CLI::App &app);

/// Registers the moe passes with MLIR's registry (once per process): for
/// pipelines, recipes and `moec passes`.
void registerPassesOnce();

/// Prints "moec: error: <message>" to stderr.
void printError(const std::string &message);

/// Peak resident set of this process in bytes.

/// Prints "moec: warning: <message>" to stderr.
void printWarning(const std::string &message);

} // namespace moe::cli

#endif // MOEC_TOOLS_MOEC_COMMANDS_H
