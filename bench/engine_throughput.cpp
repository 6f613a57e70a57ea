//===- engine_throughput.cpp - Prefill/decode speed and bandwidth ---------===//
//
// Part of moec. Measures the engine's prefill and decode tokens/s on a model
// directory, the weight bytes one decoded token reads (bf16 checkpoints stay
// bf16 in memory, 2 bytes per parameter; other dtypes become f32), the machine's
// memory bandwidth by a copy and a read benchmark, the fraction of it that
// decoding reaches, and peak RSS. Prints JSON.
//
//   engine_throughput DIR [--prompt P] [--decode D] [--max-memory BYTES]
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/ModelSummary.h"
#include "moe/Runtime/Model.h"

#include "moe/Runtime/Device.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/GgufModel.h"
#include "moe/Runtime/Package.h"
#include "moe/Support/Threads.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstring>
#include <iostream>
#include <random>
#include <sys/resource.h>
#include <thread>

#include "Bandwidth.h"

using namespace moe;
using Clock = std::chrono::steady_clock;

namespace {

double secondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

} // namespace

int main(int argc, char **argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::cerr
        << "usage: engine_throughput DIR|.moepkg|.gguf [--prompt P] [--decode D] [--max-memory BYTES] [--threads N]\n"
           "                         [--decode-start prompt|empty] [--bandwidth yes|no] [--row-tiles yes|no]\n"
           "                         [--expert-cache BYTES] [--expert-policy lru|frequency] [--text FILE]\n"
           "                         [--expert-fallback FORMAT] [--expert-fallback-below SHARE]\n"
           "                         [--device cpu|cuda|auto (default cpu)] [--warmup short|full] [--repeat R]\n";
    return 2;
  }
  int64_t promptTokens = 256, decodeTokens = 32;
  EngineOptions options;
  // Decode after the prompt (default), or from an empty cache as
  // llama-bench's tg does; the bandwidth measurement takes a few seconds.
  bool decodeFromEmpty = false, measureBandwidth = true;
  // Real text instead of random ids: the prompt is its first tokens and
  // decode is fed the following ones (teacher forcing), so routing is the
  // model's routing on text.
  std::string textPath;
  // Warm-up before timing: 8 tokens (the weights' first use), or a whole
  // prompt as llama-bench's does (the work buffers at their full size);
  // prefill and decode are then timed `repeat` times and their rates
  // averaged, as llama-bench's -r (the decode counters, layer loads and
  // expert hits, are the last run's; --text's perplexity the first's).
  bool fullWarmup = false;
  int64_t repeat = 1;
  for (size_t i = 1; i + 1 < args.size(); i += 2) {
    if (args[i] == "--prompt")
      promptTokens = std::stoll(args[i + 1]);
    else if (args[i] == "--decode")
      decodeTokens = std::stoll(args[i + 1]);
    else if (args[i] == "--max-memory")
      options.maxMemoryBytes = std::stoull(args[i + 1]);
    else if (args[i] == "--text")
      textPath = args[i + 1];
    else if (args[i] == "--expert-cache")
      options.expertCacheBytes = std::stoull(args[i + 1]);
    else if (args[i] == "--expert-policy")
      options.expertCachePolicy = args[i + 1] == "frequency" ? ExpertCachePolicy::Frequency : ExpertCachePolicy::Lru;
    else if (args[i] == "--expert-fallback") {
      options.expertFallbackNested = args[i + 1] == "nested";
      options.expertFallbackFormat = quant::parseQuantFormat(args[i + 1]);
      if (!options.expertFallbackFormat && !options.expertFallbackNested) {
        std::cerr << "engine_throughput: --expert-fallback " << args[i + 1] << ": not a quant format or nested\n";
        return 2;
      }
    } else if (args[i] == "--expert-fallback-below")
      options.expertFallbackBelow = std::stod(args[i + 1]);
    else if (args[i] == "--warmup") {
      if (args[i + 1] != "short" && args[i + 1] != "full") {
        std::cerr << "engine_throughput: --warmup " << args[i + 1] << ": expected short or full\n";
        return 2;
      }
      fullWarmup = args[i + 1] == "full";
    } else if (args[i] == "--repeat")
      repeat = std::stoll(args[i + 1]);
    else if (args[i] == "--decode-start")
      decodeFromEmpty = args[i + 1] == "empty";
    else if (args[i] == "--bandwidth")
      measureBandwidth = args[i + 1] != "no";
    else if (args[i] == "--row-tiles") {
      // The CPU's row tiles made at load (the default), or the stored rows.
      if (args[i + 1] != "yes" && args[i + 1] != "no") {
        std::cerr << "engine_throughput: --row-tiles " << args[i + 1] << ": expected yes or no\n";
        return 2;
      }
      options.rowTiles = args[i + 1] == "yes";
    } else if (args[i] == "--threads")
      setThreadCount(static_cast<unsigned>(std::stoul(args[i + 1])));
    else if (args[i] == "--device") {
      Expected<DeviceChoice> choice = parseDeviceChoice(args[i + 1]);
      Expected<std::shared_ptr<Device>> device =
          choice ? openDevice(*choice) : Expected<std::shared_ptr<Device>>(choice.status());
      if (!device) {
        std::cerr << "engine_throughput: " << device.status().message() << "\n";
        return 2;
      }
      options.device = device.take();
    }
  }
  if (promptTokens < 1 || decodeTokens < 0 || repeat < 1) {
    std::cerr << "engine_throughput: --prompt needs at least one token, --decode none or more, --repeat one or more\n";
    return 2;
  }
  auto loadStart = Clock::now();
  Expected<LoadedModel> model = loadModel(args[0], options);
  if (!model) {
    std::cerr << "engine_throughput: error: " << model.status().message() << "\n";
    return 1;
  }
  const ModelSpec &spec = model->spec;
  std::mt19937 rng(7);
  std::vector<int32_t> prompt(static_cast<size_t>(promptTokens)), text;
  for (int32_t &id : prompt)
    id = static_cast<int32_t>(rng() % spec.vocabSize);
  if (!textPath.empty()) {
    Expected<std::vector<EvalStream>> streams = readEvalData(textPath, model->tokenizer.get(), model->endOfText);
    if (!streams) {
      std::cerr << "engine_throughput: error: " << streams.status().message() << "\n";
      return 1;
    }
    for (const EvalStream &stream : *streams)
      text.insert(text.end(), stream.ids.begin(), stream.ids.end());
    if (static_cast<int64_t>(text.size()) < promptTokens + decodeTokens + 1) {
      std::cerr << "engine_throughput: error: " << textPath << " has " << text.size() << " tokens, fewer than --prompt "
                << promptTokens << " + --decode " << decodeTokens << "\n";
      return 1;
    }
    for (int32_t id : text)
      if (id < 0 || id >= spec.vocabSize) {
        std::cerr << "engine_throughput: error: " << textPath << ": token id " << id << " outside the vocabulary\n";
        return 1;
      }
    std::copy_n(text.begin(), promptTokens, prompt.begin());
  }

  // Warm-up: converts and caches the weights (first use).
  auto failed = [](const Status &status) {
    std::cerr << "engine_throughput: error: " << status.message() << "\n";
    return 1;
  };
  KvCache cache = model->engine->newCache();
  std::vector<float> logits;
  if (Status status =
          model->engine->forward(std::span(prompt).first(std::min<size_t>(8, prompt.size())), cache, logits, true);
      !status.ok())
    return failed(status);
  double loadSeconds = secondsSince(loadStart);

  if (fullWarmup) {
    cache = model->engine->newCache();
    if (Status status = model->engine->forward(prompt, cache, logits, true); !status.ok())
      return failed(status);
  }
  std::vector<double> prefillRates, decodeRates;
  for (int64_t run = 0; run < repeat; ++run) {
    cache = model->engine->newCache();
    auto start = Clock::now();
    if (Status status = model->engine->forward(prompt, cache, logits, true); !status.ok())
      return failed(status);
    prefillRates.push_back(static_cast<double>(promptTokens) / secondsSince(start));
  }
  const std::vector<float> promptLogits = logits;
  int64_t loadsBeforeDecode = 0;
  size_t layerBytesBeforeDecode = 0;
  // With --text, the negative log-likelihood of each next text token as
  // decoding predicts it (the quality of what decoding computed, e.g. with
  // low-bit expert fallbacks), after the timing; of the first run only.
  double decodeNll = 0;
  int64_t decodeTargets = 0;
  for (int64_t run = 0; run < repeat; ++run) {
    std::vector<int32_t> next = {
        static_cast<int32_t>(std::max_element(promptLogits.begin(), promptLogits.end()) - promptLogits.begin())};
    if (decodeFromEmpty) {
      cache = model->engine->newCache();
    } else if (run > 0) { // the prompt in the cache again (untimed)
      cache = model->engine->newCache();
      if (Status status = model->engine->forward(prompt, cache, logits, true); !status.ok())
        return failed(status);
    }
    loadsBeforeDecode = model->engine->layerCache().loads();
    layerBytesBeforeDecode = model->engine->layerCache().loadedBytes();
    if (ExpertCache *experts = model->engine->expertCache())
      experts->resetCounters();
    auto start = Clock::now();
    for (int64_t i = 0; i < decodeTokens; ++i) {
      if (!text.empty())
        next[0] = text[static_cast<size_t>(promptTokens + i)];
      if (Status status = model->engine->forward(next, cache, logits, true); !status.ok())
        return failed(status);
      if (run == 0 && !text.empty() && static_cast<size_t>(promptTokens + i + 1) < text.size()) {
        const float top = *std::max_element(logits.begin(), logits.end());
        double sum = 0;
        for (float value : logits)
          sum += std::exp(static_cast<double>(value - top));
        decodeNll += std::log(sum) + top - logits[static_cast<size_t>(text[static_cast<size_t>(promptTokens + i + 1)])];
        ++decodeTargets;
      }
      next[0] = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    }
    decodeRates.push_back(static_cast<double>(decodeTokens) / secondsSince(start));
  }
  auto mean = [](const std::vector<double> &values) {
    double sum = 0;
    for (double value : values)
      sum += value;
    return sum / static_cast<double>(values.size());
  };

  // Parameters a decoded token reads: active parameters, but only one row
  // of the embedding table.
  ModelSummary summary = summarizeFromConfig(spec);
  int64_t embedding = spec.vocabSize * spec.hiddenSize;
  // The engine keeps bf16 checkpoints' matrices as bf16 and everything else
  // (f32, f16, FP8) as f32.
  std::string weightsInMemory;
  double bytesPerToken = 0;
  if (isPackagePath(args[0]) || isGgufPath(args[0])) {
    // A package: the bytes of what one token reads, from the manifest
    // (quantised blobs are read in place): every dense tensor, one
    // embedding row, and top-k experts of the layer's average size.
    Expected<OpenedPackage> package = isGgufPath(args[0]) ? openGgufModel(args[0]) : openPackage(args[0]);
    if (!package)
      return failed(package.status());
    weightsInMemory = isGgufPath(args[0]) ? "gguf" : "package";
    for (const auto &[role, tensor] : package->description.globals)
      bytesPerToken += role == TensorRole::Embedding ? static_cast<double>(tensor.size) / spec.vocabSize
                                                     : static_cast<double>(tensor.size);
    for (size_t l = 0; l < package->description.layers.size(); ++l) {
      const LayerEntry &layer = package->description.layers[l];
      for (const auto &[role, tensor] : layer.tensors)
        bytesPerToken += static_cast<double>(tensor.size);
      if (layer.experts.empty())
        continue;
      double expertBytes = 0;
      for (const ExpertEntry &expert : layer.experts) {
        expertBytes += static_cast<double>(expert.gate.size + expert.up.size + expert.down.size);
        for (const ExpertPart &part : expert.moreParts)
          expertBytes += static_cast<double>(part.gate.size + part.up.size + part.down.size);
        for (const TensorRef &factor : expert.lowRank) // factored: the right factors too
          expertBytes += static_cast<double>(factor.size);
      }
      const int64_t topK = layer.routing.router ? layer.routing.router->topK : spec.router.topK;
      bytesPerToken += expertBytes / static_cast<double>(layer.experts.size()) * static_cast<double>(topK);
      if (layer.expertBase) // factored experts' base: read once for every token
        bytesPerToken +=
            static_cast<double>(layer.expertBase->gate.size + layer.expertBase->up.size + layer.expertBase->down.size);
    }
  } else {
    const bool bf16 = model->checkpoint->find("model.embed_tokens.weight")->info->dtype == DType::BF16;
    weightsInMemory = bf16 ? "bf16" : "f32";
    bytesPerToken = (bf16 ? 2.0 : 4.0) * static_cast<double>(summary.activeParameters - embedding + spec.hiddenSize);
  }
  const double decodeTokensPerSecond = mean(decodeRates);
  // Peak RSS of the model run, before the bandwidth buffers exist.
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  const moe::bench::Bandwidth measured =
      measureBandwidth ? moe::bench::memoryBandwidth(threadCount()) : moe::bench::Bandwidth{};
  const double copyBandwidth = measured.copyGbPerS, readBandwidth = measured.readGbPerS;

  nlohmann::json out = {
      {"benchmark", "engine_throughput"},
      {"model", args[0]},
      {"family", familyName(spec.family)},
      {"total_parameters", summary.totalParameters},
      {"active_parameters", summary.activeParameters},
      {"load_seconds", loadSeconds},
      {"threads", threadCount()},
      {"prompt_tokens", promptTokens},
      {"warmup", fullWarmup ? "full" : "short"},
      {"repeat", repeat},
      {"prefill_tokens_per_second", mean(prefillRates)},
      {"prefill_tokens_per_second_runs", prefillRates},
      {"decode_tokens_per_second_runs", decodeRates},
      {"decode_tokens", decodeTokens},
      {"decode_start", decodeFromEmpty ? "empty" : "prompt"},
      {"row_tiles", options.rowTiles},
      {"text", textPath.empty() ? nlohmann::json(nullptr) : nlohmann::json(textPath)},
      {"decode_tokens_per_second", decodeTokensPerSecond},
      {"weight_bytes_per_decoded_token", bytesPerToken},
      {"weights_in_memory", weightsInMemory},
      {"decode_weight_gb_per_s", bytesPerToken * decodeTokensPerSecond / 1e9},
      {"memory_copy_gb_per_s", copyBandwidth},
      {"memory_read_gb_per_s", readBandwidth},
      {"decode_fraction_of_read_bandwidth",
       readBandwidth > 0 ? bytesPerToken * decodeTokensPerSecond / 1e9 / readBandwidth : 0.0},
      {"max_memory_bytes", options.maxMemoryBytes},
      {"resident_layer_bytes_peak", model->engine->layerCache().peakResidentBytes()},
      {"layer_loads", model->engine->layerCache().loads()},
      {"decode_layer_loads", model->engine->layerCache().loads() - loadsBeforeDecode},
      {"decode_bytes_loaded_per_token",
       static_cast<double>(model->engine->layerCache().loadedBytes() - layerBytesBeforeDecode +
                           (model->engine->expertCache() ? model->engine->expertCache()->counters().bytesLoaded : 0)) /
           static_cast<double>(std::max<int64_t>(decodeTokens, 1))},
      {"peak_rss_bytes", static_cast<int64_t>(usage.ru_maxrss) * 1024}};
  if (decodeTargets > 0) {
    const double perplexity = std::exp(decodeNll / static_cast<double>(decodeTargets));
    // A NaN would print as null: a broken model is an error, not a result.
    if (!std::isfinite(perplexity))
      return failed(Status::error("--text: decoding computes non-finite logits (NaN or infinity); the model's "
                                  "weights or config are broken"));
    out["decode_text_perplexity"] = perplexity;
  }
  if (const ExpertCache *experts = model->engine->expertCache()) {
    out["expert_cache_bytes"] = options.expertCacheBytes;
    out["expert_policy"] = options.expertCachePolicy == ExpertCachePolicy::Frequency ? "frequency" : "lru";
    out["decode_expert_hits"] = experts->counters().hits;
    out["decode_expert_misses"] = experts->counters().misses;
    out["decode_expert_hit_rate"] = experts->counters().hitRate();
    out["expert_resident_bytes_peak"] = experts->peakResidentBytes();
    if (experts->hasFallbacks()) {
      out["expert_fallback"] = options.expertFallbackNested ? "nested" : options.expertFallbackFormat->name();
      out["expert_fallback_below"] = options.expertFallbackBelow;
      out["expert_fallback_bytes"] = experts->fallbackBytes();
      out["decode_expert_fallbacks"] = experts->counters().fallbacks;
    }
  }
  std::cout << out.dump(2) << "\n";
  return 0;
}
