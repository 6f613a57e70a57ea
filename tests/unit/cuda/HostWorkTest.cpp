//===- HostWorkTest.cpp - The host's work per decoded token, counted ------===//
//
// Part of moec. At batch 1 a small MoE model on a GPU is held by the host,
// not by the device's bandwidth: each launch, copy and wait costs
// microseconds whatever it moves (BENCHMARKS.md, "CUDA engine": OLMoE at
// 3-5% of HBM with a dozen launches and a wait a layer). The CUDA engine's
// design is that a token whose layers the device holds and routes costs
// the host one graph launch (the token's graph; one per layer part with
// --graphs layer), a few copies and one wait, and that nothing is allocated
// or captured again once the graphs exist. The
// CPU emulation of CUDA counts what the host asks of the device
// (moe::emulation::counters), so these tests hold that design to numbers
// on every machine. Built only into moec-cuda-emulated-tests.
//
//===----------------------------------------------------------------------===//

#include <cuda_runtime.h>

#include "EngineComparison.h"
#include "moe/Runtime/Device.h"
#include "moe/Runtime/Model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

using namespace moe;

namespace {

std::string dataDir() {
  if (const char *dir = std::getenv("MOEC_TEST_DATA_DIR"))
    return dir;
  return MOEC_TEST_DATA_DIR;
}

/// The counters' change over one decoded token, averaged over `tokens`.
struct PerToken {
  double launches = 0, graphLaunches = 0, graphNodes = 0, copies = 0, memsets = 0, captured = 0, waits = 0,
         allocations = 0, frees = 0, kernelRuns = 0;
  double hostCalls() const { return launches + graphLaunches + copies + memsets; }
};

PerToken perToken(const emulation::Counters &before, const emulation::Counters &after, int tokens) {
  const auto d = [&](uint64_t emulation::Counters::*field) {
    return static_cast<double>(after.*field - before.*field) / tokens;
  };
  PerToken p;
  p.launches = d(&emulation::Counters::launches);
  p.graphLaunches = d(&emulation::Counters::graphLaunches);
  p.graphNodes = d(&emulation::Counters::graphNodes);
  p.copies = d(&emulation::Counters::copies);
  p.memsets = d(&emulation::Counters::memsets);
  p.captured = d(&emulation::Counters::captured);
  p.waits = d(&emulation::Counters::waits);
  p.allocations = d(&emulation::Counters::allocations);
  p.frees = d(&emulation::Counters::frees);
  p.kernelRuns = d(&emulation::Counters::kernelRuns);
  return p;
}

/// Decodes `warm` tokens after a short prompt, then counts the host's work
/// over `counted` more.
PerToken decodeAndCount(Engine &engine, const ModelSpec &spec, int warm, int counted) {
  KvCache cache = engine.newCache();
  std::vector<float> logits;
  std::vector<int32_t> prompt;
  for (int32_t i = 0; i < 8; ++i)
    prompt.push_back(static_cast<int32_t>((i * 7919 + 13) % spec.vocabSize));
  EXPECT_TRUE(engine.forward(prompt, cache, logits).ok());
  emulation::Counters before;
  for (int t = 0; t < warm + counted; ++t) {
    if (t == warm)
      before = emulation::counters();
    const int32_t id = static_cast<int32_t>((t * 104729 + 7) % spec.vocabSize);
    const Status status = engine.forward(std::span<const int32_t>(&id, 1), cache, logits);
    EXPECT_TRUE(status.ok()) << status.message();
  }
  return perToken(before, emulation::counters(), counted);
}

/// `tokens` tokens decoded one at a time by both engines from their
/// caches: the largest difference between their logits.
double decodeSideBySide(LoadedModel &device, LoadedModel &cpu, KvCache &deviceCache, KvCache &cpuCache, int tokens) {
  std::vector<float> deviceLogits, cpuLogits;
  double most = 0;
  for (int t = 0; t < tokens; ++t) {
    const int32_t id = static_cast<int32_t>((t * 104729 + 7) % device.spec.vocabSize);
    const Status status = device.engine->forward(std::span<const int32_t>(&id, 1), deviceCache, deviceLogits);
    EXPECT_TRUE(status.ok()) << status.message();
    EXPECT_TRUE(cpu.engine->forward(std::span<const int32_t>(&id, 1), cpuCache, cpuLogits).ok());
    most = std::max(most, moe::testing::maxDifference(deviceLogits, cpuLogits));
  }
  return most;
}

void print(const std::string &what, const PerToken &p) {
  std::printf("host work per token, %s: %.2f launches, %.2f graph launches (%.2f operations in them), %.2f copies, "
              "%.2f memsets, %.2f waits, %.2f captured, %.2f allocations; %.2f kernels run\n",
              what.c_str(), p.launches, p.graphLaunches, p.graphNodes, p.copies, p.memsets, p.waits, p.captured,
              p.allocations, p.kernelRuns);
}

} // namespace

TEST(HostWork, ADecodedTokenWaitsOnceAndReplaysItsLayers) {
  // Both fixtures (grouped-query attention; MLA with a dense first layer)
  // with every MoE layer routed on the device.
  for (const char *name : {"tiny-mixtral", "tiny-deepseek"}) {
    const std::string path = dataDir() + "/fixtures/" + name;
    SCOPED_TRACE(path);
    auto [device, model] = moe::testing::loadOnCuda(path);
    ASSERT_TRUE(model) << model.status().message();
    const int64_t layers = model->spec.numLayers;

    ASSERT_TRUE((*device)->chooseRouting("device").ok());
    const PerToken graphs = decodeAndCount(*model->engine, model->spec, 4, 4);
    print(std::string(name) + ", graphs", graphs);
    const int64_t moeLayers = std::count_if(model->spec.layers.begin(), model->spec.layers.end(),
                                            [](const LayerSpec &l) { return l.mlp == MlpKind::Moe; });
    ASSERT_EQ((*device)->routedLayers(), moeLayers) << "every MoE layer routed on the device";
    EXPECT_EQ((*device)->graphStats().failures, 0) << (*device)->graphStats().firstFailure;
    // One wait a token, for its logits; nothing allocated, nothing
    // captured again (a graph captured anew every token would cost more
    // than the launches it saves).
    EXPECT_EQ(graphs.waits, 1.0);
    EXPECT_EQ(graphs.allocations, 0.0);
    EXPECT_EQ(graphs.frees, 0.0);
    EXPECT_EQ(graphs.captured, 0.0);
    // Each layer is two graphs, its attention and its MLP (routed on the
    // device, or dense), and the token's end (final norm, output
    // projection) a third, all launched as one graph of the token. The
    // rest is six calls whatever the depth: the input's copy, the position
    // and angles in one copy, the expert-call counter's reset, and one copy
    // each for the logits, the counter and every layer's new key and value
    // rows.
    EXPECT_EQ(graphs.graphLaunches, 1.0) << "the token's graph";
    EXPECT_EQ(graphs.hostCalls() - graphs.graphLaunches, 6.0) << "host calls beside the graphs";
    EXPECT_EQ(graphs.copies, 5.0) << "one copy out for every layer's rows";
    const DeviceGraphStats stats = (*device)->graphStats();
    EXPECT_EQ(stats.tokenFailures, 0) << stats.firstFailure;
    EXPECT_EQ(stats.tokenGraphs, 1) << "built once, the second time the same layers' graphs came";
    EXPECT_GE(stats.tokenReplays, 4);

    // The layers' graphs one by one: the same kernels.
    ASSERT_TRUE((*device)->chooseGraphs("layer").ok());
    const PerToken layerGraphs = decodeAndCount(*model->engine, model->spec, 2, 4);
    print(std::string(name) + ", a graph a layer", layerGraphs);
    EXPECT_EQ(layerGraphs.graphLaunches, static_cast<double>(2 * layers + 1));
    EXPECT_EQ(layerGraphs.graphNodes, graphs.graphNodes);
    EXPECT_EQ(layerGraphs.kernelRuns, graphs.kernelRuns);
    EXPECT_EQ(layerGraphs.hostCalls() - layerGraphs.graphLaunches, 6.0);
    ASSERT_TRUE((*device)->chooseGraphs("token").ok());

    // The same token launch by launch: the graphs' operations, now each a
    // call of the host.
    ASSERT_TRUE((*device)->chooseRouting("device-eager").ok());
    const PerToken eager = decodeAndCount(*model->engine, model->spec, 2, 4);
    print(std::string(name) + ", launches", eager);
    EXPECT_EQ(eager.waits, 1.0);
    EXPECT_EQ(eager.graphLaunches, 0.0);
    EXPECT_EQ(eager.kernelRuns, graphs.kernelRuns) << "the graphs replay the same kernels";
    EXPECT_GT(eager.hostCalls(), graphs.hostCalls() + static_cast<double>(layers));
  }
}

TEST(HostWork, ALayerRoutedOnTheHostWaitsOnceMoreAndEveryRowStillArrives) {
  // Layer 1 masks an expert, which only the host's router knows: it hands
  // its MLP input back (a wait in the middle of the token), while layers 0,
  // 2 and 3 leave their key and value rows in their slots until the end.
  const std::string path = dataDir() + "/fixtures/tiny-mixtral";
  auto [device, gpu] = moe::testing::loadOnCuda(path);
  Expected<LoadedModel> cpu = loadModel(path);
  ASSERT_TRUE(gpu && cpu) << (gpu ? cpu.status().message() : gpu.status().message());
  ASSERT_TRUE((*device)->chooseRouting("device").ok());
  const std::map<int64_t, std::set<int64_t>> masked = {{1, {0}}};
  ASSERT_TRUE(gpu->engine->setMaskedExperts(masked).ok());
  ASSERT_TRUE(cpu->engine->setMaskedExperts(masked).ok());
  const PerToken counted = decodeAndCount(*gpu->engine, gpu->spec, 4, 4);
  print("tiny-mixtral, layer 1 routed on the host", counted);
  EXPECT_EQ(counted.waits, 2.0) << "the hand-back and the logits";
  EXPECT_EQ(counted.captured, 0.0);
  // Layer 0's two graphs go one by one before layer 1's launches; layers 2
  // and 3 and the token's end, one graph.
  EXPECT_EQ(counted.graphLaunches, 3.0);
  EXPECT_EQ((*device)->graphStats().tokenFailures, 0);

  // The same tokens on the CPU: logits and every layer's cache rows agree.
  KvCache gpuCache = gpu->engine->newCache(), cpuCache = cpu->engine->newCache();
  const double logits = decodeSideBySide(*gpu, *cpu, gpuCache, cpuCache, 24);
  ASSERT_EQ(gpuCache.keys.size(), cpuCache.keys.size());
  for (size_t l = 0; l < cpuCache.keys.size(); ++l) {
    ASSERT_EQ(gpuCache.keys[l].size(), cpuCache.keys[l].size()) << "layer " << l;
    ASSERT_EQ(gpuCache.values[l].size(), cpuCache.values[l].size()) << "layer " << l;
  }
  const double rows = moe::testing::maxCacheDifference(gpuCache, cpuCache);
  std::printf("masked layer: max |logit difference| %.3g, max |key or value difference| %.3g\n", logits, rows);
  EXPECT_LE(logits, 1e-3);
  EXPECT_LE(rows, 1e-3);
}

TEST(HostWork, ALayerLoadedForOneTokenCapturesNoGraph) {
  // A memory budget below the model's weights: the engine loads each layer
  // for the token that needs it and drops it after. A graph is captured at
  // its layer's second token, and lives with the layer's weights, so none
  // is captured here (a capture costs more than the launches it saves),
  // and the logits are the CPU engine's.
  const std::string path = dataDir() + "/fixtures/tiny-deepseek";
  EngineOptions options;
  options.maxMemoryBytes = 1;
  auto [device, gpu] = moe::testing::loadOnCuda(path, options);
  Expected<LoadedModel> cpu = loadModel(path);
  ASSERT_TRUE(gpu && cpu) << (gpu ? cpu.status().message() : gpu.status().message());
  ASSERT_TRUE((*device)->chooseRouting("device").ok());
  KvCache gpuCache = gpu->engine->newCache(), cpuCache = cpu->engine->newCache();
  const emulation::Counters before = emulation::counters();
  const double most = decodeSideBySide(*gpu, *cpu, gpuCache, cpuCache, 6);
  const PerToken counted = perToken(before, emulation::counters(), 6);
  print("tiny-deepseek, every layer loaded per token", counted);
  EXPECT_GT(counted.allocations, 0.0) << "the layers were loaded again (else the budget did not bite)";
  EXPECT_LE(counted.graphLaunches, 1.0) << "at most the token's end, whose graph lives with the model";
  ASSERT_GT(counted.graphLaunches, 0.0);
  EXPECT_NEAR(counted.captured * 6, counted.graphNodes / counted.graphLaunches, 1e-9)
      << "one capture in all: the token's end";
  EXPECT_LE(most, 1e-3);
}

TEST(HostWork, GroupFormatsAreRoundedByTheKernelsThatWriteTheirInputs) {
  // A product over a group format reads its input rounded to int8 per
  // group. The kernel that writes that input rounds it too: the norms
  // before the attention's projections and MLA's up-projections, attention
  // itself (each head's values, where the groups divide a head), the
  // routing kernel (the MoE input, while one warp routes) and SwiGLU (each
  // expert's down input); no rounding launch of its own. The packages the
  // emulated.PackagesDecodeAsOnTheCpu test makes: tiny-mixtral through the
  // default recipe (4-bit attention and experts of different widths in
  // groups of 64; its heads of 40 values take a rounding launch) and
  // tiny-deepseek at 4 bits in groups of 32 (MLA, its value heads of 32;
  // the first layer dense), and qwen3_moe as four query heads of 32 over
  // one KV head at 4 bits in groups of 32 (tests/unit/cuda/GroupedVariant.h:
  // a block of attention takes the four heads and rounds their values).
  // Routers and lm_head stay float.
  const char *dir = std::getenv("MOEC_DEVICE_PACKAGES");
  // Kernels a token: per layer, then the token's end (the norm and lm_head).
  const std::map<std::string, int64_t (*)(const LayerSpec &)> perLayer = {
      // Attention: the norm, q/k/v, the epilogue, attention, the output's
      // rounding, the output, the residual add with the MLP's norm, the
      // router: 8. The MoE block: routing, gate and up (with SwiGLU and
      // its rounding), down (with the weighted sum): 3.
      {"tiny-mixtral-default.moepkg", [](const LayerSpec &) -> int64_t { return 8 + 3; }},
      // MLA: the norm, the query and the keys' low-rank columns, their
      // norm, the up-projection, RoPE of the query and of the shared
      // columns, the keys, attention, the output, the residual add with the
      // MLP's norm: 10, and the router in a MoE layer. A MoE block: 3 (as
      // above). A dense MLP: gate and up (their input's rounding, then the
      // products), SwiGLU, down, the sum: 5.
      {"tiny-deepseek-q4-g32.moepkg",
       [](const LayerSpec &l) -> int64_t { return 10 + (l.mlp == MlpKind::Moe ? 1 + 3 : 5); }},
      // As tiny-mixtral's, less the output's rounding: 7 + 3.
      {"qwen3-gqa-q4-g32.moepkg", [](const LayerSpec &) -> int64_t { return 7 + 3; }},
  };
  int found = 0;
  for (const auto &[name, kernels] : perLayer) {
    const std::string path = dir ? std::string(dir) + "/" + name : std::string();
    if (path.empty() || !std::filesystem::exists(path))
      continue;
    ++found;
    SCOPED_TRACE(path);
    auto [device, model] = moe::testing::loadOnCuda(path);
    ASSERT_TRUE(model) << model.status().message();
    ASSERT_TRUE((*device)->chooseRouting("device").ok());
    const PerToken p = decodeAndCount(*model->engine, model->spec, 4, 4);
    print(name, p);
    const int64_t moeLayers = std::count_if(model->spec.layers.begin(), model->spec.layers.end(),
                                            [](const LayerSpec &l) { return l.mlp == MlpKind::Moe; });
    ASSERT_EQ((*device)->routedLayers(), moeLayers) << "every MoE layer routed on the device";
    EXPECT_EQ((*device)->graphStats().failures, 0) << (*device)->graphStats().firstFailure;
    int64_t expected = 2;
    for (const LayerSpec &layer : model->spec.layers)
      expected += kernels(layer);
    EXPECT_EQ(p.kernelRuns, static_cast<double>(expected));
    EXPECT_EQ(p.waits, 1.0);
    EXPECT_EQ(p.captured, 0.0);
    // SwiGLU (with its rounding) and the weighted sum as launches of their
    // own: two more a MoE block.
    ASSERT_TRUE((*device)->chooseMoeKernels("apart").ok());
    const PerToken apart = decodeAndCount(*model->engine, model->spec, 4, 4);
    print(name + ", MoE kernels apart", apart);
    EXPECT_EQ(apart.kernelRuns, static_cast<double>(expected + 2 * moeLayers));
    EXPECT_EQ(apart.waits, 1.0);
    ASSERT_TRUE((*device)->chooseMoeKernels("fused").ok());
  }
  // ctest's run over the packages it makes ($MOEC_PARITY_PACKAGES) has them
  // all; elsewhere (a GPU's packages) those present.
  if (const char *only = std::getenv("MOEC_PARITY_PACKAGES"); only && *only && std::string(only) != "0")
    EXPECT_EQ(found, static_cast<int>(perLayer.size())) << "packages missing from $MOEC_DEVICE_PACKAGES";
  if (found == 0)
    GTEST_SKIP() << "no packages of group formats in $MOEC_DEVICE_PACKAGES";
}
