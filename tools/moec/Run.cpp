//===- Run.cpp - moec eval and moec generate ------------------------------===//
//
// Part of moec. Both run a model through the runtime engine: eval measures
// perplexity and bits per byte (per domain), generate streams text.
//
//===----------------------------------------------------------------------===//

#include "Commands.h"

#include "moe/Runtime/Sampling.h"

#include "ModuleFiles.h"

#include "moe/Lowering/Lowering.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Model.h"
#include "moe/Support/ByteSize.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <random>

namespace moe::cli {

/// A size (moe/Support/ByteSize.h) as whole bytes.
static std::optional<size_t> parseBytes(const std::string &text) {
  std::optional<double> bytes = parseByteSize(text);
  if (!bytes)
    return std::nullopt;
  return static_cast<size_t>(*bytes);
}

/// Lowers the module at `path` and runs it (DESIGN.md: the backend lowers a
/// module to the description the runtime executes).
static Expected<LoadedModel> loadModuleModel(const std::string &path, const EngineOptions &options,
                                             bool simulateQuantized, const std::string &task) {
  Expected<ModelDescription> description = readModuleDescription(path);
  if (!description)
    return description.status();
  description->dequantizeQuantized = simulateQuantized;
  return loadDescribedModel(description.take(), options, task);
}

void addModelOptions(CLI::App *command, ModelOptions &options) {
  command
      ->add_option("model", options.path,
                   "Model: a Hugging Face checkpoint directory, a moe module (.mlir), a package (.moepkg) or a GGUF "
                   "file moec wrote")
      ->required();
  command->add_option("--max-memory", options.maxMemory,
                      "Budget for converted weights, e.g. 2G (default: the whole model when it fits)");
  command->add_flag("--simulate-quantized", options.simulateQuantized,
                    "Run quantised tensors as their dequantised f32 values instead of the integer kernels");
  command->add_option("--expert-cache", options.expertCache,
                      "Offload routed experts: keep at most this many bytes of them (e.g. 1G), loading the others "
                      "on demand; the rest of each layer stays under --max-memory");
  command->add_option("--expert-policy", options.expertPolicy, "Which cached expert to evict: lru or frequency")
      ->check(CLI::IsMember({"lru", "frequency"}))
      ->capture_default_str();
  command->add_option("--expert-fallback", options.expertFallback,
                      "With --expert-cache, HOBBIT's low-precision replacement: keep every routed expert also in "
                      "this quant format (e.g. q4_g32_asym, made at load), or `nested` (the low part of a nested "
                      "package's experts, as stored), and run a missing expert from it when no token gives it "
                      "--expert-fallback-below of its routing weight");
  command
      ->add_option("--expert-fallback-below", options.expertFallbackBelow,
                   "Share of a token's routing weight under which a missing expert runs in low precision")
      ->capture_default_str();
  command->add_option("--task", options.task,
                      "A package with task expert sets (moec compress with \"tasks\"): run the set NAME (its other "
                      "experts never loaded), auto (eval and generate: the set nearest each request's routing "
                      "signature; the default) or all (every expert)");
  command
      ->add_option("--task-signature", options.taskSignature,
                   "--task auto compares routing signatures at the first MoE layer (PreMoe's) or at all of them "
                   "(a request then runs through every layer once more)")
      ->check(CLI::IsMember({"first", "all"}))
      ->capture_default_str();
  command->add_option("--device", options.device,
                      "Where matrix products run: cpu, cuda (an NVIDIA GPU; the build must have CUDA) or auto (the "
                      "GPU when there is one). Default: auto for eval and generate, cpu for the commands that make "
                      "statistics; $MOEC_DEVICE replaces the default");
}

Expected<LoadedModel> openModel(const ModelOptions &options) {
  EngineOptions engineOptions;
  const char *deviceDefault = std::getenv("MOEC_DEVICE");
  const std::string deviceName = !options.device.empty() ? options.device
                                 : deviceDefault         ? std::string(deviceDefault)
                                                         : options.deviceDefault;
  Expected<DeviceChoice> choice = parseDeviceChoice(deviceName);
  if (!choice)
    return choice.status();
  Expected<std::shared_ptr<Device>> device = openDevice(*choice);
  if (!device)
    return device.status();
  engineOptions.device = device.take();
  if (!options.maxMemory.empty()) {
    std::optional<size_t> bytes = parseBytes(options.maxMemory);
    if (!bytes)
      return Status::error("--max-memory '", options.maxMemory, "': expected a size such as 512M or 4G");
    engineOptions.maxMemoryBytes = *bytes;
    engineOptions.nestedBudgetBytes = *bytes;
  }
  if (!options.expertCache.empty()) {
    std::optional<size_t> bytes = parseBytes(options.expertCache);
    if (!bytes || *bytes == 0)
      return Status::error("--expert-cache '", options.expertCache, "': expected a size such as 512M or 4G");
    engineOptions.expertCacheBytes = *bytes;
    engineOptions.expertCachePolicy =
        options.expertPolicy == "frequency" ? ExpertCachePolicy::Frequency : ExpertCachePolicy::Lru;
  }
  if (options.expertFallback == "nested") {
    engineOptions.expertFallbackNested = true;
    engineOptions.expertFallbackBelow = options.expertFallbackBelow;
  } else if (!options.expertFallback.empty()) {
    engineOptions.expertFallbackFormat = quant::parseQuantFormat(options.expertFallback);
    if (!engineOptions.expertFallbackFormat)
      return Status::error("--expert-fallback '", options.expertFallback,
                           "': expected a quant format such as q4_g32_asym or q8_g32_sym, or nested");
    engineOptions.expertFallbackBelow = options.expertFallbackBelow;
  }
  Expected<LoadedModel> model =
      isModuleFile(options.path) ? loadModuleModel(options.path, engineOptions, options.simulateQuantized, options.task)
                                 : loadModel(options.path, engineOptions, options.task);
  if (model) {
    for (const std::string &warning : model->warnings)
      printWarning(warning);
    for (const std::string &note : model->notes)
      std::fprintf(stderr, "moec: %s\n", note.c_str());
  }
  return model;
}

TaskRetrieval taskRetrieval(const ModelOptions &options, const LoadedModel &model) {
  TaskRetrieval retrieval;
  retrieval.active = !model.taskSets.empty() && (options.task.empty() || options.task == "auto");
  retrieval.scope = options.taskSignature == "all" ? TaskSignatureScope::AllLayers : TaskSignatureScope::FirstLayer;
  return retrieval;
}

Status TaskRetrieval::choose(LoadedModel &model, std::span<const int32_t> request) {
  const std::span<const int32_t> prompt =
      request.first(std::min<size_t>(request.size(), static_cast<size_t>(promptTokens)));
  Expected<size_t> index = retrieveTaskSet(*model.engine, model.taskSets, prompt, scope);
  if (!index)
    return index.status();
  ++chosen[model.taskSets[*index].name];
  return Status::success();
}

Expected<ModelAndData> openModelAndData(const ModelOptions &options, const std::string &data) {
  Expected<LoadedModel> model = openModel(options);
  if (!model)
    return model.status();
  Expected<std::vector<EvalStream>> streams = readEvalData(data, model->tokenizer.get(), model->endOfText);
  if (!streams)
    return streams.status();
  return ModelAndData{model.take(), streams.take()};
}

namespace {

using json = nlohmann::json;

struct EvalCommandOptions {
  ModelOptions model;
  std::string data;
  int64_t sequenceLength = 256;
  int64_t stride = 0;
  int64_t maxTokens = 0;
  bool llamaPerplexity = false;
  bool json = false;
  std::string compare; ///< The original model, for KL divergence and top-1 agreement.
  int64_t taskPrompt = 64;
};

int runEval(const EvalCommandOptions &options) {
  Expected<ModelAndData> input = openModelAndData(options.model, options.data);
  if (!input) {
    printError(input.status().message());
    return 1;
  }
  LoadedModel &model = input->model;
  const std::vector<EvalStream> &streams = input->streams;
  EvalOptions evalOptions{options.sequenceLength, options.stride, options.maxTokens, options.llamaPerplexity};
  // Task expert sets: a set chosen at load, or one retrieved per window.
  TaskRetrieval retrieval = taskRetrieval(options.model, model);
  retrieval.promptTokens = options.taskPrompt;
  if (retrieval.active)
    evalOptions.beforeWindow = [&](std::span<const int32_t> inputs) { return retrieval.choose(model, inputs); };
  std::optional<LoadedModel> original;
  if (!options.compare.empty()) {
    ModelOptions originalOptions = options.model;
    originalOptions.path = options.compare;
    originalOptions.simulateQuantized = false;
    originalOptions.task = "all";
    Expected<LoadedModel> opened = openModel(originalOptions);
    if (!opened) {
      printError("--compare: " + opened.status().message());
      return 1;
    }
    original = opened.take();
    evalOptions.reference = original->engine.get();
  }
  Expected<EvalResult> result = evaluate(*model.engine, streams, evalOptions);
  if (!result) {
    printError(result.status().message());
    return 1;
  }
  const EvalResult &r = *result;
  double tokensPerSecond = r.seconds > 0 ? r.overall.targets / r.seconds : 0.0;
  if (options.json) {
    json out = evalResultToJson(r);
    out["model"] = options.model.path;
    out["data"] = options.data;
    out["seq_len"] = options.sequenceLength;
    out["stride"] = options.stride > 0 ? options.stride : options.sequenceLength;
    out["seconds"] = r.seconds;
    out["tokens_per_second"] = tokensPerSecond;
    if (!options.compare.empty())
      out["original"] = options.compare;
    out["layer_weight_bytes"] = model.engine->layerCache().peakResidentBytes();
    if (!model.task.empty())
      out["task"] = model.task;
    if (retrieval.active)
      out["task"] = {{"mode", "auto"}, {"prompt_tokens", retrieval.promptTokens}, {"windows", retrieval.chosen}};
    if (const ExpertCache *experts = model.engine->expertCache())
      out["expert_cache"] = {
          {"bytes", experts->residentBytes()},          {"peak_bytes", experts->peakResidentBytes()},
          {"hits", experts->counters().hits},           {"misses", experts->counters().misses},
          {"hit_rate", experts->counters().hitRate()},  {"bytes_loaded", experts->counters().bytesLoaded},
          {"fallbacks", experts->counters().fallbacks}, {"fallback_bytes", experts->fallbackBytes()}};
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::printf("model:        %s\n", options.model.path.c_str());
  std::printf("data:         %s (%zu %s)\n", options.data.c_str(), streams.size(),
              streams.size() == 1 ? "stream" : "domains");
  std::printf("perplexity:   %.4f over %lld targets", r.overall.perplexity(),
              static_cast<long long>(r.overall.targets));
  if (r.overall.textBytes > 0)
    std::printf(", %.4f bits/byte", r.overall.bitsPerByte());
  std::printf("\n");
  if (r.domains.size() > 1) {
    std::printf("\n  %-20s %12s %10s %10s\n", "domain", "perplexity", "bits/byte", "targets");
    for (const auto &[name, score] : r.domains)
      std::printf("  %-20s %12.4f %10.4f %10lld\n", name.c_str(), score.perplexity(), score.bitsPerByte(),
                  static_cast<long long>(score.targets));
    std::printf("\n");
  }
  if (r.comparison) {
    const EvalComparison &c = *r.comparison;
    std::printf("against:      %s (perplexity %.4f; ratio %.4f)\n", options.compare.c_str(), c.referencePerplexity,
                c.perplexityRatio);
    std::printf("KL divergence: mean %.5f, median %.5f, 99th percentile %.5f, max %.4f nats per token\n", c.klMean,
                c.klMedian, c.klP99, c.klMax);
    std::printf("top-1 agreement: %.2f%% of %lld tokens\n", 100 * c.top1Agreement, static_cast<long long>(c.tokens));
  }
  std::printf("experts/token: %.2f per MoE layer\n", r.expertsPerToken);
  if (!model.task.empty())
    std::printf("task set:     %s (chosen at load)\n", model.task.c_str());
  if (retrieval.active) {
    std::printf("task sets:    retrieved per window from its first %lld tokens:",
                static_cast<long long>(retrieval.promptTokens));
    for (const auto &[name, windows] : retrieval.chosen)
      std::printf(" %s %lld", name.c_str(), static_cast<long long>(windows));
    std::printf("\n");
  }
  if (const ExpertCache *experts = model.engine->expertCache())
    std::printf("expert cache: %.1f%% hits (%lld of %lld), %.1f MB loaded, at most %.1f MB resident\n",
                100 * experts->counters().hitRate(), static_cast<long long>(experts->counters().hits),
                static_cast<long long>(experts->counters().hits + experts->counters().misses),
                static_cast<double>(experts->counters().bytesLoaded) / 1e6,
                static_cast<double>(experts->peakResidentBytes()) / 1e6);
  if (const ExpertCache *experts = model.engine->expertCache(); experts && experts->hasFallbacks())
    std::printf("low-bit fallback: %lld experts run from low-bit copies instead of loading (%.1f MB of copies)\n",
                static_cast<long long>(experts->counters().fallbacks),
                static_cast<double>(experts->fallbackBytes()) / 1e6);
  std::printf("speed:        %.1f tokens/s (%.1f s)\n", tokensPerSecond, r.seconds);
  return 0;
}

struct GenerateOptions {
  ModelOptions model;
  std::string prompt;
  int64_t tokens = 64;
  double temperature = 0.0;
  int64_t topK = 0;
  uint64_t seed = 0;
  bool ignoreEndOfText = false;
};

int runGenerate(const GenerateOptions &options) {
  Expected<LoadedModel> model = openModel(options.model);
  if (!model) {
    printError(model.status().message());
    return 1;
  }
  if (!model->tokenizer) {
    printError(options.model.path + ": no tokenizer.json; generate needs one");
    return 1;
  }
  Expected<std::vector<int32_t>> prompt = model->tokenizer->encode(options.prompt, true);
  if (!prompt) {
    printError(prompt.status().message());
    return 1;
  }
  if (prompt->empty() && model->endOfText)
    prompt->push_back(*model->endOfText);
  if (prompt->empty()) {
    printError("the prompt encodes to no tokens");
    return 1;
  }
  // Prefill is quadratic in the prompt, and positions past the context
  // are outside what the model knows: refuse up front, and stop at the end.
  const int64_t context = model->spec.maxPositions;
  if (static_cast<int64_t>(prompt->size()) >= context) {
    printError(concat("the prompt is ", prompt->size(), " tokens; the model's context is ", context,
                      " tokens (config.json max_position_embeddings), with room for at least one new token. "
                      "Shorten the prompt"));
    return 1;
  }
  int64_t budget = options.tokens;
  if (static_cast<int64_t>(prompt->size()) + budget > context) {
    budget = context - static_cast<int64_t>(prompt->size());
    printWarning(concat("the prompt (", prompt->size(), " tokens) leaves room for ", budget,
                        " new tokens in the model's context of ", context, "; generating ", budget));
  }
  // Task expert sets: the prompt's routing signature picks one.
  if (TaskRetrieval retrieval = taskRetrieval(options.model, *model); retrieval.active) {
    retrieval.promptTokens = static_cast<int64_t>(prompt->size());
    if (Status status = retrieval.choose(*model, *prompt); !status.ok()) {
      printError(status.message());
      return 1;
    }
    std::fprintf(stderr, "task set: %s (retrieved from the prompt)\n", retrieval.chosen.begin()->first.c_str());
  }
  std::mt19937_64 rng(options.seed);
  KvCache cache = model->engine->newCache();
  std::vector<float> logits;
  std::vector<int32_t> generated;
  std::string printed;
  std::span<const int32_t> next = *prompt;
  int32_t token;
  std::fputs(options.prompt.c_str(), stdout);
  for (int64_t i = 0; i < budget; ++i) {
    Status status = model->engine->forward(next, cache, logits, /*lastOnly=*/true);
    if (!status.ok()) {
      printError(status.message());
      return 1;
    }
    Expected<int32_t> sampled =
        sampleToken(logits.data(), model->spec.vocabSize, SamplingOptions{options.temperature, options.topK}, rng);
    if (!sampled) {
      printError(
          concat("generate, position ", static_cast<int64_t>(prompt->size()) + i, ": ", sampled.status().message()));
      return 1;
    }
    token = *sampled;
    if (!options.ignoreEndOfText && model->endOfText && token == *model->endOfText)
      break;
    generated.push_back(token);
    // Print what the new token adds, holding back a split UTF-8 character.
    std::string text = model->tokenizer->decode(generated, true);
    bool partial = text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0;
    if (!partial && text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0) {
      std::fputs(text.c_str() + printed.size(), stdout);
      std::fflush(stdout);
      printed = text;
    }
    next = std::span<const int32_t>(&generated.back(), 1);
  }
  std::string text = model->tokenizer->decode(generated, true);
  if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0)
    std::fputs(text.c_str() + printed.size(), stdout);
  std::fputs("\n", stdout);
  return 0;
}

} // namespace

Command registerEval(CLI::App &app) {
  auto options = std::make_shared<EvalCommandOptions>();
  CLI::App *command = app.add_subcommand("eval", "Perplexity and bits per byte of a model on text or token ids");
  options->model.deviceDefault = "auto";
  addModelOptions(command, options->model);
  command->add_option("--data", options->data, "Plain text, .jsonl ({\"text\"|\"ids\", \"domain\"}) or .u32 token ids")
      ->required();
  command->add_option("--seq-len", options->sequenceLength, "Window length in tokens")->check(CLI::PositiveNumber);
  command->add_option("--stride", options->stride, "Overlapping windows every N tokens (default: --seq-len)")
      ->check(CLI::PositiveNumber);
  command->add_option("--max-tokens", options->maxTokens, "Stop after this many targets per domain")
      ->check(CLI::PositiveNumber);
  command->add_flag("--llama-perplexity", options->llamaPerplexity,
                    "Windows as llama-perplexity takes them: side by side, each scoring its second half");
  command->add_option("--compare", options->compare,
                      "The original model (checkpoint, module or package): also report KL divergence of the "
                      "next-token distributions (mean, median, 99th percentile), top-1 agreement and the perplexity "
                      "ratio, over the same windows");
  command
      ->add_option("--task-prompt", options->taskPrompt,
                   "With task sets retrieved per window (--task auto): the window's first N tokens are the "
                   "request whose routing signature picks the set")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  command->add_flag("--json", options->json, "Print JSON");
  return {command, [options] { return runEval(*options); }};
}

Command registerGenerate(CLI::App &app) {
  auto options = std::make_shared<GenerateOptions>();
  CLI::App *command = app.add_subcommand("generate", "Continue a prompt, streaming tokens as they come");
  options->model.deviceDefault = "auto";
  addModelOptions(command, options->model);
  command->add_option("--prompt", options->prompt, "Text to continue")->required();
  command->add_option("-n,--tokens", options->tokens, "Tokens to generate")->check(CLI::PositiveNumber);
  command->add_option("--temperature", options->temperature, "0 for greedy (default)")->check(CLI::NonNegativeNumber);
  command->add_option("--top-k", options->topK, "Sample among the k most likely tokens (0: all)")
      ->check(CLI::NonNegativeNumber);
  command->add_option("--seed", options->seed, "Random seed for sampling");
  command->add_flag("--ignore-eos", options->ignoreEndOfText, "Keep going past the end-of-text token");
  return {command, [options] { return runGenerate(*options); }};
}

} // namespace moe::cli
