//===- cuda_engine.cpp - The engine on a device, on real model shapes -----===//
//
// Part of moec. Builds a model of real shapes (a config.json) with synthetic
// weights made in memory in the format asked (random codes with scales that
// keep activations of unit size, or bf16), runs the engine on --device, and
// prints JSON: prefill tokens/s at --prompt, decode tokens/s one token a
// step (batch 1) and --step tokens a step after a prompt of --context
// tokens, the weight bytes one decoded token reads (and the KV cache bytes
// its attention reads), the device's measured copy bandwidth and the
// fraction of it that decoding reaches. The weights are random: this
// measures speed, never quality.
//
//   cuda_engine --config FILE [--layers N] [--format q4_g128_asym|bf16]
//               [--prompt 512] [--decode 64] [--step 8] [--context 16]
//               [--device auto|cuda|cpu] [--threads N]
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/DType.h"
#include "moe/Runtime/Device.h"
#include "moe/Runtime/Engine.h"
#include "moe/Support/Threads.h"

#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <cmath>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <thread>

using namespace moe;
using Clock = std::chrono::steady_clock;

namespace {

double secondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

uint64_t next(uint64_t &state) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return state;
}

/// Random weights of a [rows, cols] matrix whose products keep a unit-size
/// activation about unit size: uniform in +-1/sqrt(cols) (bf16 or f32), or
/// uniform codes whose scale gives that spread.
struct Fill {
  Matrix *matrix;
  int64_t rows, cols;
  std::optional<quant::QuantFormat> format;
  bool f32 = false;
  uint64_t seed;

  void run() const {
    Matrix &m = *matrix;
    m.rows = rows;
    m.cols = cols;
    uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
    const float bound = 1.0f / std::sqrt(static_cast<float>(cols));
    if (format) {
      const quant::QuantFormat &f = *format;
      m.quantFormat = f;
      m.quantStorage.resize(f.matrixBytes(rows, cols));
      uint8_t *bytes = m.quantStorage.data();
      size_t i = 0;
      for (; i + 8 <= m.quantStorage.size(); i += 8) {
        const uint64_t value = next(state);
        std::memcpy(bytes + i, &value, 8);
      }
      for (; i < m.quantStorage.size(); ++i)
        bytes[i] = static_cast<uint8_t>(next(state));
      const float levels = static_cast<float>(1 << f.bits);
      const float scale = 2.0f * bound * std::sqrt(3.0f) / levels;
      const uint16_t scaleBits = quant::floatToScale(scale, f.scaleType);
      const uint16_t minBits = quant::floatToScale(-(levels - 1) / 2 * scale, f.scaleType);
      const int64_t groups = f.groupsPerRow(cols);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t g = 0; g < groups; ++g) {
          uint8_t *header = bytes + static_cast<size_t>(r) * f.rowBytes(cols) + static_cast<size_t>(g) * f.groupBytes();
          std::memcpy(header, &scaleBits, 2);
          if (!f.symmetric)
            std::memcpy(header + 2, &minBits, 2);
        }
      m.quantData = m.quantStorage.data();
      return;
    }
    auto uniform = [&] {
      return (static_cast<float>(next(state) >> 40) / static_cast<float>(1 << 24) * 2.0f - 1.0f) * bound;
    };
    if (f32) {
      m.data.resize(static_cast<size_t>(rows * cols));
      for (float &v : m.data)
        v = uniform();
    } else {
      m.bf16.resize(static_cast<size_t>(rows * cols));
      for (uint16_t &v : m.bf16)
        v = floatToBfloat16(uniform());
    }
  }
};

void runFills(const std::vector<Fill> &fills) {
  std::atomic<size_t> index{0};
  std::vector<std::thread> threads;
  const unsigned count = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned t = 0; t < count; ++t)
    threads.emplace_back([&] {
      for (size_t i; (i = index.fetch_add(1)) < fills.size();)
        fills[i].run();
    });
  for (std::thread &thread : threads)
    thread.join();
}

bool isNorm(TensorRole role) {
  switch (role) {
  case TensorRole::FinalNorm:
  case TensorRole::AttentionNorm:
  case TensorRole::MlpNorm:
  case TensorRole::QueryNorm:
  case TensorRole::KeyNorm:
  case TensorRole::QueryDownNorm:
  case TensorRole::KvDownNorm:
    return true;
  default:
    return false;
  }
}

bool isRoutedExpert(TensorRole role) {
  return role == TensorRole::ExpertGate || role == TensorRole::ExpertUp || role == TensorRole::ExpertDown ||
         role == TensorRole::ExpertGateUpFused || role == TensorRole::ExpertDownFused;
}

/// Layers of synthetic weights: matrices in `format` (bf16 when none), the
/// embedding bf16, the router f32, norms 1 and biases 0.
class SyntheticProvider : public WeightProvider {
public:
  SyntheticProvider(ModelSpec spec, std::optional<quant::QuantFormat> format) : spec(std::move(spec)), format(format) {}

  Status loadGlobals(GlobalWeights &globals) override {
    std::vector<Fill> fills;
    for (const TensorSpec &tensor : spec.tensors())
      if (tensor.layer < 0) {
        WeightSlot slot = globalSlot(globals, tensor.role);
        if (slot.matrix)
          fills.push_back({slot.matrix, tensor.shape[0], tensor.shape[1],
                           tensor.role == TensorRole::Embedding ? std::nullopt : format, false, seed++});
        else if (slot.vector)
          slot.vector->assign(static_cast<size_t>(tensor.shape[0]), isNorm(tensor.role) ? 1.0f : 0.0f);
      }
    runFills(fills);
    globalBytes = globals.outputProjection().bytes();
    return Status::success();
  }

  /// After every layer was loaded once: the bytes of the output projection
  /// and every layer without its routed experts, and one expert's bytes.
  double fixedBytes() const {
    double total = static_cast<double>(globalBytes);
    for (const auto &[layer, bytes] : layerFixedBytes)
      total += static_cast<double>(bytes);
    return total;
  }
  double expertBytes() const { return static_cast<double>(oneExpertBytes); }

  Status loadLayer(int64_t layer, LayerWeights &w, bool routedExperts) override {
    std::vector<Fill> fills;
    for (const TensorSpec &tensor : spec.tensors()) {
      if (tensor.layer != layer || isRoutedExpert(tensor.role))
        continue;
      WeightSlot slot = layerSlot(w, tensor.role);
      if (slot.matrix)
        fills.push_back({slot.matrix, tensor.shape[0], tensor.shape[1],
                         tensor.role == TensorRole::Router ? std::nullopt : format, tensor.role == TensorRole::Router,
                         seed++});
      else if (slot.vector)
        slot.vector->assign(static_cast<size_t>(tensor.shape[0]), isNorm(tensor.role) ? 1.0f : 0.0f);
    }
    const LayerSpec &layerSpec = spec.layers[static_cast<size_t>(layer)];
    if (layerSpec.mlp == MlpKind::Moe) {
      w.experts.resize(static_cast<size_t>(layerSpec.numExperts));
      if (routedExperts)
        for (MlpWeights &expert : w.experts)
          addExpert(expert, layerSpec, fills);
    }
    runFills(fills);
    size_t experts = 0;
    for (const MlpWeights &expert : w.experts)
      experts += expert.bytes();
    layerFixedBytes[layer] = w.bytes() - experts;
    if (!w.experts.empty() && experts > 0)
      oneExpertBytes = experts / w.experts.size();
    return Status::success();
  }

  Status loadExpert(int64_t layer, int64_t slot, MlpWeights &expert) override {
    std::vector<Fill> fills;
    addExpert(expert, spec.layers[static_cast<size_t>(layer)], fills);
    runFills(fills);
    return Status::success();
  }

private:
  void addExpert(MlpWeights &expert, const LayerSpec &layer, std::vector<Fill> &fills) {
    const int64_t H = spec.hiddenSize, I = layer.expertIntermediateSize;
    fills.push_back({&expert.gate, I, H, format, false, seed++});
    fills.push_back({&expert.up, I, H, format, false, seed++});
    fills.push_back({&expert.down, H, I, format, false, seed++});
  }

  ModelSpec spec;
  std::optional<quant::QuantFormat> format;
  uint64_t seed = 1;
  size_t globalBytes = 0, oneExpertBytes = 0;
  std::map<int64_t, size_t> layerFixedBytes;
};

} // namespace

int main(int argc, char **argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string configPath, formatName = "q4_g128_asym", deviceName = "auto", productKernel, routing, prefill, launches,
                          graphChoice, moeKernels;
  int64_t layers = 0, promptTokens = 512, decodeTokens = 64, step = 8, context = 16, attentionSplits = -1;
  for (size_t i = 0; i + 1 < args.size(); i += 2) {
    const std::string &flag = args[i], &value = args[i + 1];
    const bool numeric = flag == "--layers" || flag == "--prompt" || flag == "--decode" || flag == "--step" ||
                         flag == "--context" || flag == "--attention-splits" || flag == "--threads";
    if (numeric && (value.empty() || value.find_first_not_of("0123456789") != std::string::npos || value.size() > 9)) {
      std::cerr << "cuda_engine: " << flag << " " << value << ": expected a whole number\n";
      return 2;
    }
    if (flag == "--config")
      configPath = value;
    else if (flag == "--layers")
      layers = std::stoll(value);
    else if (flag == "--format")
      formatName = value;
    else if (flag == "--prompt")
      promptTokens = std::stoll(value);
    else if (flag == "--decode")
      decodeTokens = std::stoll(value);
    else if (flag == "--step")
      step = std::stoll(value);
    else if (flag == "--context")
      context = std::stoll(value);
    else if (flag == "--attention-splits")
      attentionSplits = std::stoll(value);
    else if (flag == "--device")
      deviceName = value;
    else if (flag == "--product-kernel")
      productKernel = value;
    else if (flag == "--routing")
      routing = value;
    else if (flag == "--launches")
      launches = value;
    else if (flag == "--graphs")
      graphChoice = value;
    else if (flag == "--moe-kernels")
      moeKernels = value;
    else if (flag == "--prefill")
      prefill = value;
    else if (flag == "--threads")
      setThreadCount(static_cast<unsigned>(std::stoul(value)));
    else {
      std::cerr << "cuda_engine: unknown option " << flag << "\n";
      return 2;
    }
  }
  if (configPath.empty() || args.size() % 2 != 0) {
    std::cerr << "usage: cuda_engine --config FILE [--layers N] [--format FORMAT|bf16] [--prompt P] [--decode D]\n"
                 "                   [--step S] [--device auto|cuda|cpu] [--threads N]\n"
                 "                   [--product-kernel auto|streamed|warp-per-row|dp4a] [--routing "
                 "device|device-eager|host]\n"
                 "                   [--prefill host|device] [--launches dependent|plain] [--context C]\n"
                 "                   [--attention-splits 0..64] [--graphs token|layer] [--moe-kernels fused|apart]\n";
    return 2;
  }
  auto fail = [](const std::string &message) {
    std::cerr << "cuda_engine: error: " << message << "\n";
    return 1;
  };
  std::ifstream in(configPath);
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json config = nlohmann::json::parse(text.str(), nullptr, false);
  if (!in || config.is_discarded() || !config.is_object())
    return fail(configPath + ": not a JSON object");
  if (layers > 0)
    config["num_hidden_layers"] = layers;
  Expected<ModelSpec> spec = ModelSpec::fromConfigText(config.dump(), configPath);
  if (!spec)
    return fail(spec.status().message());
  std::optional<quant::QuantFormat> format;
  if (formatName != "bf16") {
    format = quant::parseQuantFormat(formatName);
    if (!format)
      return fail("--format " + formatName + ": not a quant format (or bf16)");
  }
  Expected<DeviceChoice> choice = parseDeviceChoice(deviceName);
  if (!choice)
    return fail(choice.status().message());
  Expected<std::shared_ptr<Device>> device = openDevice(*choice);
  if (!device)
    return fail(device.status().message());
  if (!productKernel.empty()) {
    if (!*device)
      return fail("--product-kernel needs a device");
    if (Status chosen = (*device)->chooseProductKernel(productKernel); !chosen.ok())
      return fail(chosen.message());
  }
  if (!prefill.empty()) {
    if (!*device)
      return fail("--prefill needs a device");
    if (Status chosen = (*device)->choosePrefill(prefill); !chosen.ok())
      return fail(chosen.message());
  }
  if (!launches.empty()) {
    if (!*device)
      return fail("--launches needs a device");
    if (Status chosen = (*device)->chooseLaunches(launches); !chosen.ok())
      return fail(chosen.message());
  }
  if (!moeKernels.empty()) {
    if (!*device)
      return fail("--moe-kernels needs a device");
    if (Status chosen = (*device)->chooseMoeKernels(moeKernels); !chosen.ok())
      return fail(chosen.message());
  }
  // Untimed steps before each timed run (a device captures its graphs at
  // the first and builds the token's graph at the third; a KV mirror that
  // grew at the first is captured again at the second).
  constexpr int64_t kWarmSteps = 4;
  // The positions a decode run of `perStep` tokens a step takes.
  auto decodePositions = [&](int64_t perStep) {
    return context + (kWarmSteps + std::max<int64_t>(1, decodeTokens / perStep)) * perStep;
  };
  if (step < 1 || decodeTokens < 1)
    return fail("--step and --decode take 1 or more");
  if (context < 1 || decodePositions(1) > spec->maxPositions || decodePositions(step) > spec->maxPositions)
    return fail("--context " + std::to_string(context) + ": the prompt and the decoded tokens must fit the model's " +
                std::to_string(spec->maxPositions) + " positions");
  if (!graphChoice.empty()) {
    if (!*device)
      return fail("--graphs needs a device");
    if (Status chosen = (*device)->chooseGraphs(graphChoice); !chosen.ok())
      return fail(chosen.message());
  }
  if (attentionSplits >= 0) {
    if (!*device)
      return fail("--attention-splits needs a device");
    if (Status chosen = (*device)->chooseAttentionSplits(attentionSplits); !chosen.ok())
      return fail(chosen.message());
  }
  if (!routing.empty()) {
    if (!*device)
      return fail("--routing needs a device");
    if (Status chosen = (*device)->chooseRouting(routing); !chosen.ok())
      return fail(chosen.message());
  }
  EngineOptions options;
  options.device = *device;
  auto loadStart = Clock::now();
  auto provider = std::make_unique<SyntheticProvider>(*spec, format);
  SyntheticProvider *synthetic = provider.get();
  Expected<std::unique_ptr<Engine>> made = Engine::create(*spec, std::move(provider), options);
  if (!made)
    return fail(made.status().message());
  Engine &engine = **made;

  std::mt19937 rng(7);
  auto randomTokens = [&](int64_t count) {
    std::vector<int32_t> ids(static_cast<size_t>(count));
    for (int32_t &id : ids)
      id = static_cast<int32_t>(rng() % spec->vocabSize);
    return ids;
  };
  std::vector<float> logits;
  // Warm-up: makes and uploads every layer, and sizes the device's
  // scratch and staging buffers with a prefill of the measured length and
  // a few decode steps (as a server would before its first request).
  {
    KvCache cache = engine.newCache();
    std::vector<int32_t> warm = randomTokens(promptTokens);
    if (Status status = engine.forward(warm, cache, logits, true); !status.ok())
      return fail(status.message());
    for (int i = 0; i < 2; ++i)
      if (Status status = engine.forward(randomTokens(1), cache, logits, true); !status.ok())
        return fail(status.message());
  }
  const double loadSeconds = secondsSince(loadStart);
  // Weight bytes: per layer, what every token reads (attention, dense and
  // shared MLPs, router) and one routed expert's bytes.
  double fixedBytes = synthetic->fixedBytes(), expertBytes = synthetic->expertBytes();

  double moeLayers = 0;
  for (const LayerSpec &layer : spec->layers)
    moeLayers += layer.mlp == MlpKind::Moe ? 1 : 0;
  nlohmann::json result;
  result["config"] = configPath;
  result["layers"] = spec->numLayers;
  result["format"] = formatName;
  result["device"] = *device ? (*device)->description() : "cpu";
  result["threads"] = threadCount();
  result["product_kernel"] = productKernel.empty() ? "default" : productKernel;
  result["routing"] = routing.empty() ? "default" : routing;
  result["prefill"] = prefill.empty() ? "default" : prefill;
  result["launches"] = launches.empty() ? "default" : launches;
  result["graphs"] = graphChoice.empty() ? "default" : graphChoice;
  result["moe_kernels"] = moeKernels.empty() ? "default" : moeKernels;
  result["load_seconds"] = loadSeconds;
  if (*device)
    result["device_resident_bytes"] = (*device)->residentBytes();

  // Prefill.
  {
    KvCache cache = engine.newCache();
    std::vector<int32_t> prompt = randomTokens(promptTokens);
    if (*device)
      (*device)->resetBusySeconds();
    auto start = Clock::now();
    if (Status status = engine.forward(prompt, cache, logits, true); !status.ok())
      return fail(status.message());
    const double seconds = secondsSince(start);
    result["prefill_tokens"] = promptTokens;
    result["prefill_tokens_per_second"] = static_cast<double>(promptTokens) / seconds;
    // The share of prefill inside the device's calls (products, their
    // transfers and the MoE blocks' gathers and sums); the rest is the
    // host's (attention, norms, routing, staging copies). The decode path
    // (--prefill device) is not timed this way.
    if (*device && prefill != "device")
      result["prefill_device_busy_fraction"] = (*device)->busySeconds() / seconds;
  }
  // Decode, one token a step and `step` tokens a step, after a prompt of
  // `context` tokens.
  result["decode_context"] = context;
  result["attention_splits"] = attentionSplits < 0 ? "default" : std::to_string(attentionSplits);
  auto decode = [&](int64_t perStep, const char *prefix) -> Status {
    KvCache cache = engine.newCache();
    std::vector<int32_t> prompt = randomTokens(context);
    MOE_RETURN_IF_ERROR(engine.forward(prompt, cache, logits, true));
    // Untimed steps on this cache (kWarmSteps): a device captures its
    // per-layer graphs for this cache's addresses, then the token's graph.
    for (int64_t warm = 0; warm < kWarmSteps; ++warm)
      MOE_RETURN_IF_ERROR(engine.forward(randomTokens(perStep), cache, logits, true));
    engine.resetRoutingCounters();
    if (*device)
      (*device)->resetBusySeconds();
    const int64_t steps = std::max<int64_t>(1, decodeTokens / perStep);
    auto start = Clock::now();
    for (int64_t s = 0; s < steps; ++s)
      MOE_RETURN_IF_ERROR(engine.forward(randomTokens(perStep), cache, logits, true));
    const double seconds = secondsSince(start);
    const double tokens = static_cast<double>(steps * perStep);
    const double expertCalls = static_cast<double>(engine.routingCounters().expertCalls) / tokens;
    // Bytes a step reads: the fixed weights once, and each distinct expert
    // its tokens chose. Synthetic routing is about uniform, so a layer of E
    // experts choosing k per token reads E (1 - (1 - k/E)^S) distinct
    // experts for S tokens (k for one).
    double distinct = 0;
    for (const LayerSpec &layer : spec->layers)
      if (layer.mlp == MlpKind::Moe) {
        const double E = static_cast<double>(layer.numExperts), k = expertCalls / moeLayers;
        distinct += E * (1.0 - std::pow(1.0 - k / E, static_cast<double>(perStep)));
      }
    const double stepBytes = fixedBytes + distinct * expertBytes;
    // The KV cache's bytes a step's attention reads (float rows; each
    // token of the step reads each key and value head once, at the run's
    // middle position): apart from the weights, which the fractions below
    // count.
    const AttentionSpec &a = spec->attention;
    const double middle =
        static_cast<double>(context + kWarmSteps * perStep) + static_cast<double>(steps * perStep) / 2;
    result[std::string(prefix) + "cache_bytes_per_step"] =
        static_cast<double>(perStep) * middle * static_cast<double>(spec->numLayers) *
        static_cast<double>(a.numKeyValueHeads * (a.headDim + a.valueHeadDim)) * 4.0;
    result[std::string(prefix) + "tokens_per_second"] = tokens / seconds;
    result[std::string(prefix) + "expert_calls_per_token"] = expertCalls;
    result[std::string(prefix) + "weight_bytes_per_step"] = stepBytes;
    result[std::string(prefix) + "weight_read_bytes_per_second"] = stepBytes * static_cast<double>(steps) / seconds;
    // Time inside the device's product calls (transfers included); decode
    // with the residual stream on the device is not timed this way.
    if (*device && (*device)->busySeconds() > 0)
      result[std::string(prefix) + "device_busy_fraction"] = (*device)->busySeconds() / seconds;
    return Status::success();
  };
  if (Status status = decode(1, "decode_"); !status.ok())
    return fail(status.message());
  if (step > 1)
    if (Status status = decode(step, "step_"); !status.ok())
      return fail(status.message());
  result["step_tokens"] = step;
  if (*device) {
    Expected<double> bandwidth = (*device)->copyBandwidth();
    if (!bandwidth)
      return fail(bandwidth.status().message());
    result["device_copy_bytes_per_second"] = *bandwidth;
    result["layers_routed_on_device"] = (*device)->routedLayers();
    const DeviceGraphStats graphs = (*device)->graphStats();
    result["graph_captures"] = graphs.captures;
    result["graph_replays"] = graphs.replays;
    result["graph_failures"] = graphs.failures;
    result["token_graphs"] = graphs.tokenGraphs;
    result["token_graph_replays"] = graphs.tokenReplays;
    result["token_graph_failures"] = graphs.tokenFailures;
    if (!graphs.firstFailure.empty()) {
      result["graph_first_failure"] = graphs.firstFailure;
      std::cerr << "cuda_engine: a CUDA graph failed, its layer ran launch by launch: " << graphs.firstFailure << "\n";
    }
    // Bytes decoding reads per second beside the bytes a copy moves (read
    // and written) per second: the memory system's measured rate.
    result["decode_fraction_of_copy_bandwidth"] =
        result["decode_weight_read_bytes_per_second"].get<double>() / *bandwidth;
    result["step_fraction_of_copy_bandwidth"] = result.value("step_weight_read_bytes_per_second", 0.0) / *bandwidth;
    // The same with the KV cache's bytes (what a long --context adds).
    const double decodeSteps = result["decode_weight_read_bytes_per_second"].get<double>() /
                               result["decode_weight_bytes_per_step"].get<double>();
    result["decode_fraction_of_copy_bandwidth_with_cache"] =
        (result["decode_weight_bytes_per_step"].get<double>() + result["decode_cache_bytes_per_step"].get<double>()) *
        decodeSteps / *bandwidth;
  }
  std::cout << result.dump(2) << "\n";
  return 0;
}
