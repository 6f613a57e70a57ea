//===- Model.h - Open a model directory for running -------------*- C++ -*-===//
//
// Part of moec. The runtime's entry point: a Hugging Face checkpoint
// directory becomes a bound ModelSpec, an Engine and, when the directory has
// a tokenizer.json, a Tokenizer.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_MODEL_H
#define MOE_RUNTIME_MODEL_H

#include "moe/Frontend/Checkpoint.h"
#include "moe/Runtime/Description.h"
#include "moe/Runtime/Engine.h"
#include "moe/Runtime/TaskSets.h"
#include "moe/Runtime/Tokenizer.h"

#include <memory>
#include <optional>
#include <string>

namespace moe {

struct LoadedModel {
  ModelSpec spec;
  std::shared_ptr<const Checkpoint> checkpoint; ///< Null for described models.
  std::unique_ptr<Engine> engine;
  std::unique_ptr<Tokenizer> tokenizer; ///< Null without tokenizer.json.
  /// End-of-text id from tokenizer_config.json's eos_token or config.json's
  /// eos_token_id, when either names one.
  std::optional<int32_t> endOfText;
  std::vector<std::string> warnings;
  /// What loading chose for the user to know (nested experts' precisions).
  std::vector<std::string> notes;
  /// The nested precisions chosen under EngineOptions::maxMemoryBytes (a
  /// package with nested formats), or none.
  std::optional<NestedPrecisions> nestedPrecisions;
  /// Task-adaptive expert sets the package carries (TaskSets.h).
  std::vector<TaskExpertSet> taskSets;
  /// The set chosen at load (its other experts never loaded), or empty.
  std::string task;
};

/// Opens `directory`: config.json, weights (validated against the spec),
/// tokenizer.json when present. A package with task sets runs the set
/// named `task` (its other experts masked and never loaded); "", "auto" and
/// "all" load every expert (auto: the caller retrieves a set per request).
Expected<LoadedModel> loadModel(const std::string &directory, EngineOptions options = {}, const std::string &task = "");

struct ModelDescription;
/// Runs a described model (a lowered moe module); its tokenizer comes
/// from the description's asset directory when that has tokenizer.json.
/// `task` as for loadModel.
Expected<LoadedModel> loadDescribedModel(ModelDescription description, EngineOptions options = {},
                                         const std::string &task = "");

} // namespace moe

#endif // MOE_RUNTIME_MODEL_H
