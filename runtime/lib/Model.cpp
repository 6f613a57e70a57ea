//===- Model.cpp - Open a model directory for running ---------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Model.h"
#include "moe/Runtime/Description.h"
#include "moe/Runtime/GgufModel.h"
#include "moe/Runtime/Package.h"
#include "moe/Support/File.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <sys/stat.h>

namespace moe {

namespace {

bool fileExists(const std::string &path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

nlohmann::json readJson(const std::string &path) {
  Expected<std::string> text = readWholeFile(path);
  return text ? nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false) : nlohmann::json();
}

/// A tokenizer whose ids reach past the model's embedding would index
/// outside it: refuse it where it is read.
Status checkTokenizerFits(const Tokenizer &tokenizer, const std::string &source, const ModelSpec &spec) {
  if (tokenizer.vocabSize() > spec.vocabSize)
    return Status::error(source, ": token id ", tokenizer.vocabSize() - 1, " is outside the model's vocabulary of ",
                         spec.vocabSize, " (config.json vocab_size); the tokenizer belongs to another model");
  return Status::success();
}

/// The tokenizer and end-of-text id from tokenizer.json and
/// tokenizer_config.json texts (either may be empty) and the config text.
Status attachTokenizerTexts(const std::string &tokenizerText, const std::string &tokenizerSource,
                            const std::string &tokenizerConfigText, const std::string &configText, LoadedModel &model) {
  if (!tokenizerText.empty()) {
    Expected<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::fromJson(tokenizerText, tokenizerSource);
    if (!tokenizer)
      return tokenizer.status();
    MOE_RETURN_IF_ERROR(checkTokenizerFits(**tokenizer, tokenizerSource, model.spec));
    model.tokenizer = tokenizer.take();
  }
  nlohmann::json tokenizerConfig = nlohmann::json::parse(tokenizerConfigText, nullptr, false);
  if (model.tokenizer && tokenizerConfig.is_object() && tokenizerConfig.contains("eos_token") &&
      tokenizerConfig["eos_token"].is_string())
    model.endOfText = model.tokenizer->tokenId(tokenizerConfig["eos_token"].get<std::string>());
  if (!model.endOfText) {
    nlohmann::json config = nlohmann::json::parse(configText, nullptr, false);
    if (config.is_object() && config.contains("eos_token_id") && config["eos_token_id"].is_number_integer())
      model.endOfText = config["eos_token_id"].get<int32_t>();
  }
  // Some configs name an end-of-text id of another vocabulary (OLMoE test
  // models); such an id cannot be used.
  if (model.endOfText && (*model.endOfText < 0 || *model.endOfText >= model.spec.vocabSize)) {
    model.warnings.push_back(concat("end-of-text id ", *model.endOfText, " is outside the vocabulary of ",
                                    model.spec.vocabSize, "; documents are not separated"));
    model.endOfText.reset();
  }
  return Status::success();
}

/// tokenizer.json and the end-of-text id of the model in `directory`.
Status attachTokenizer(const std::string &directory, LoadedModel &model) {
  auto text = [](const std::string &path) {
    Expected<std::string> content = fileExists(path) ? readWholeFile(path) : Expected<std::string>(std::string());
    return content ? content.take() : std::string();
  };
  std::string tokenizerPath = directory + "/tokenizer.json";
  if (fileExists(tokenizerPath)) {
    Expected<std::unique_ptr<Tokenizer>> tokenizer = Tokenizer::fromFile(tokenizerPath);
    if (!tokenizer)
      return tokenizer.status();
    MOE_RETURN_IF_ERROR(checkTokenizerFits(**tokenizer, tokenizerPath, model.spec));
    model.tokenizer = tokenizer.take();
  }
  return attachTokenizerTexts("", "", text(directory + "/tokenizer_config.json"), text(directory + "/config.json"),
                              model);
}

} // namespace

Expected<LoadedModel> loadModel(const std::string &directory, EngineOptions options, const std::string &task) {
  const bool namedTask = !task.empty() && task != "auto" && task != "all";
  if (isPackagePath(directory) || isGgufPath(directory)) {
    Expected<OpenedPackage> package = isGgufPath(directory) ? openGgufModel(directory) : openPackage(directory);
    if (!package)
      return package.status();
    LoadedModel model;
    model.spec = package->description.spec;
    model.taskSets = package->description.taskSets;
    if (Status status = applyTaskAtLoad(model.taskSets, task, options); !status.ok())
      return Status::error(directory, ": ", status.message());
    if (namedTask)
      model.task = task;
    if (options.nestedBudgetBytes > 0) {
      NestedPrecisions precisions = chooseNestedPrecisions(package->description, options.nestedBudgetBytes);
      if (precisions.nestedExperts > 0) {
        package->description.nestedLow = precisions.low;
        char line[256];
        std::snprintf(line, sizeof line,
                      "nested experts: %zu of %lld at their low bits; layer weights %.2f MiB (%.2f MiB at high bits) "
                      "for --max-memory %.2f MiB; chosen by %s",
                      precisions.low.size(), static_cast<long long>(precisions.nestedExperts),
                      static_cast<double>(precisions.bytes) / 1048576.0,
                      static_cast<double>(precisions.highBytes) / 1048576.0,
                      static_cast<double>(options.nestedBudgetBytes) / 1048576.0,
                      precisions.recordedCosts ? "recorded costs" : "value difference");
        model.notes.push_back(line);
        model.nestedPrecisions = std::move(precisions);
      }
    }
    Expected<std::unique_ptr<Engine>> engine =
        Engine::create(model.spec, makeDescriptionWeightProvider(package->description), options);
    if (!engine)
      return engine.status();
    model.engine = engine.take();
    MOE_RETURN_IF_ERROR(attachTokenizerTexts(package->extras.tokenizerJson, directory + " (tokenizer)",
                                             package->extras.tokenizerConfigJson, package->description.configText,
                                             model));
    return model;
  }
  if (namedTask)
    return Status::error("--task ", task, ": ", directory,
                         " is a checkpoint; task sets live in packages (moec compress with \"tasks\")");
  LoadedModel model;
  Expected<ModelSpec> spec = ModelSpec::fromConfigFile(directory + "/config.json");
  if (!spec)
    return spec.status();
  model.spec = spec.take();
  Expected<std::unique_ptr<Checkpoint>> checkpoint = Checkpoint::open(directory);
  if (!checkpoint)
    return checkpoint.status();
  model.checkpoint = checkpoint.take();
  Expected<CheckpointReport> report = bindCheckpoint(model.spec, *model.checkpoint);
  if (!report)
    return report.status();
  model.warnings = report->warnings;
  Expected<std::unique_ptr<Engine>> engine =
      Engine::create(model.spec, makeCheckpointWeightProvider(model.spec, model.checkpoint), options);
  if (!engine)
    return engine.status();
  model.engine = engine.take();

  MOE_RETURN_IF_ERROR(attachTokenizer(directory, model));
  return model;
}

Expected<LoadedModel> loadDescribedModel(ModelDescription description, EngineOptions options, const std::string &task) {
  LoadedModel model;
  model.spec = description.spec;
  model.taskSets = description.taskSets;
  MOE_RETURN_IF_ERROR(applyTaskAtLoad(model.taskSets, task, options));
  if (!task.empty() && task != "auto" && task != "all")
    model.task = task;
  std::string assets = description.assetDirectory;
  Expected<std::unique_ptr<Engine>> engine =
      Engine::create(model.spec, makeDescriptionWeightProvider(std::move(description)), options);
  if (!engine)
    return engine.status();
  model.engine = engine.take();
  if (!assets.empty())
    MOE_RETURN_IF_ERROR(attachTokenizer(assets, model));
  return model;
}

} // namespace moe
