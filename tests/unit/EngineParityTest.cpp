//===- EngineParityTest.cpp - The engine against transformers -------------===//
//
// Part of moec. Golden logits come from the Hugging Face transformers
// implementation of each family in f32 with eager attention
// (scripts/fixtures/make_hf_goldens.py) on tiny checkpoints it saved.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Checkpoint.h"
#include "moe/Runtime/Blas.h"
#include "moe/Runtime/Engine.h"
#include "moe/Runtime/MoeBlock.h"

#include "../../runtime/lib/Kernels.h"
#include "TestSupport.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <random>

using namespace moe;
using namespace moe::testing;

namespace {

struct Loaded {
  ModelSpec spec;
  std::shared_ptr<const Checkpoint> checkpoint;
  std::unique_ptr<Engine> engine;
};

Loaded loadModel(const std::string &dir, EngineOptions options = {}) {
  Loaded loaded;
  auto spec = ModelSpec::fromConfigFile(dir + "/config.json");
  EXPECT_TRUE(spec.ok()) << spec.status().message();
  auto checkpoint = Checkpoint::open(dir);
  EXPECT_TRUE(checkpoint.ok()) << checkpoint.status().message();
  loaded.checkpoint = checkpoint.take();
  loaded.spec = spec.take();
  auto report = bindCheckpoint(loaded.spec, *loaded.checkpoint);
  EXPECT_TRUE(report.ok()) << report.status().message();
  auto engine = Engine::create(loaded.spec, makeCheckpointWeightProvider(loaded.spec, loaded.checkpoint), options);
  EXPECT_TRUE(engine.ok()) << engine.status().message();
  loaded.engine = engine.take();
  return loaded;
}

struct Golden {
  std::vector<int32_t> ids;
  std::vector<float> logits;
};

/// The 17-token golden, or with `prefix` "short_" the 6-token one.
Golden loadGolden(const std::string &name, const std::string &prefix = "") {
  Golden golden;
  auto file = SafetensorsFile::open(dataDir() + "/hf-goldens/" + name + ".safetensors");
  EXPECT_TRUE(file.ok()) << file.status().message();
  const TensorInfo *ids = (*file)->find(prefix + "input_ids");
  std::span<const uint8_t> idBytes = (*file)->data(*ids);
  for (int64_t i = 0; i < ids->numElements(); ++i) {
    int64_t id;
    std::memcpy(&id, idBytes.data() + 8 * i, 8);
    golden.ids.push_back(static_cast<int32_t>(id));
  }
  const TensorInfo *logits = (*file)->find(prefix + "logits");
  golden.logits.resize(static_cast<size_t>(logits->numElements()));
  EXPECT_TRUE(convertToF32(DType::F32, (*file)->data(*logits).data(), golden.logits.size(), golden.logits.data()).ok());
  return golden;
}

float maxAbsDifference(const std::vector<float> &a, const float *b, size_t count) {
  float worst = 0.0f;
  for (size_t i = 0; i < count; ++i)
    worst = std::max(worst, std::fabs(a[i] - b[i]));
  return worst;
}

} // namespace

class EngineParity : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineParity, PrefillLogitsMatchTransformers) {
  const std::string name = GetParam();
  Loaded model = loadModel(dataDir() + "/hf/" + name);
  ASSERT_TRUE(model.engine);
  for (const std::string prefix : {"", "short_"}) {
    Golden golden = loadGolden(name, prefix);
    KvCache cache = model.engine->newCache();
    std::vector<float> logits;
    Status status = model.engine->forward(golden.ids, cache, logits);
    ASSERT_TRUE(status.ok()) << status.message();
    ASSERT_EQ(logits.size(), golden.logits.size());
    float worst = maxAbsDifference(logits, golden.logits.data(), logits.size());
    EXPECT_LE(worst, 1e-3f) << name << " " << prefix << "logits: max |difference| " << worst;
    RecordProperty(prefix + "max_abs_logit_difference", std::to_string(worst));
  }
}

TEST_P(EngineParity, IncrementalDecodeMatchesPrefill) {
  const std::string name = GetParam();
  Loaded model = loadModel(dataDir() + "/hf/" + name);
  ASSERT_TRUE(model.engine);
  Golden golden = loadGolden(name);
  const int64_t V = model.spec.vocabSize, T = static_cast<int64_t>(golden.ids.size());
  KvCache cache = model.engine->newCache();
  std::vector<float> logits;
  const int64_t prompt = 9;
  ASSERT_TRUE(model.engine->forward(std::span(golden.ids).first(prompt), cache, logits).ok());
  EXPECT_LE(maxAbsDifference(logits, golden.logits.data(), logits.size()), 1e-3f);
  for (int64_t t = prompt; t < T; ++t) {
    ASSERT_TRUE(model.engine->forward(std::span(golden.ids).subspan(t, 1), cache, logits, true).ok());
    ASSERT_EQ(logits.size(), static_cast<size_t>(V));
    EXPECT_LE(maxAbsDifference(logits, golden.logits.data() + t * V, V), 1e-3f) << name << " position " << t;
  }
  EXPECT_EQ(cache.length, T);
}

INSTANTIATE_TEST_SUITE_P(Families, EngineParity,
                         ::testing::Values("mixtral", "mixtral_fused", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                                           "deepseek_v3", "phimoe", "phimoe_longrope", "deepseek_v2_grouped",
                                           "olmoe_clip"));

TEST(Engine, SmallMemoryBudgetStreamsLayersWithIdenticalResults) {
  const std::string dir = dataDir() + "/hf/deepseek_v2";
  Loaded whole = loadModel(dir);
  EngineOptions tight;
  tight.maxMemoryBytes = 1; // at most one layer resident at a time
  Loaded streamed = loadModel(dir, tight);
  Golden golden = loadGolden("deepseek_v2");
  std::vector<float> a, b;
  for (int pass = 0; pass < 2; ++pass) {
    KvCache cacheA = whole.engine->newCache(), cacheB = streamed.engine->newCache();
    ASSERT_TRUE(whole.engine->forward(golden.ids, cacheA, a).ok());
    ASSERT_TRUE(streamed.engine->forward(golden.ids, cacheB, b).ok());
    EXPECT_EQ(a, b);
  }
  const int64_t layers = whole.spec.numLayers;
  EXPECT_EQ(whole.engine->layerCache().loads(), layers) << "whole model stays resident";
  EXPECT_EQ(streamed.engine->layerCache().loads(), 2 * layers) << "reloaded every pass";
  size_t largestLayer = 0;
  for (int64_t l = 0; l < layers; ++l) {
    LayerWeights weights;
    auto provider = makeCheckpointWeightProvider(whole.spec, whole.checkpoint);
    ASSERT_TRUE(provider->loadLayer(l, weights).ok());
    largestLayer = std::max(largestLayer, weights.bytes());
  }
  EXPECT_LE(streamed.engine->layerCache().peakResidentBytes(), largestLayer);
}

// Expert offloading: layers held without their routed experts, experts
// loaded one by one into a small cache. Logits equal the resident engine's
// bit for bit (per-expert and fused checkpoints, prefill and decode); the
// cache never holds more than its budget plus the one expert in hand; a
// cache that fits every expert loads each once.
TEST(Engine, OffloadedExpertsGiveIdenticalLogits) {
  for (const char *name : {"mixtral", "mixtral_fused", "deepseek_v3", "qwen2_moe"}) {
    const std::string dir = dataDir() + "/hf/" + name;
    Loaded whole = loadModel(dir);
    size_t expertBytes = 0, expertCount = 0;
    {
      auto provider = makeCheckpointWeightProvider(whole.spec, whole.checkpoint);
      for (int64_t l = 0; l < whole.spec.numLayers; ++l) {
        LayerWeights weights;
        ASSERT_TRUE(provider->loadLayer(l, weights).ok());
        for (const MlpWeights &expert : weights.experts) {
          expertBytes = std::max(expertBytes, expert.bytes());
          ++expertCount;
        }
        LayerWeights without;
        ASSERT_TRUE(provider->loadLayer(l, without, false).ok());
        EXPECT_EQ(without.experts.size(), weights.experts.size());
        EXPECT_EQ(
            without.bytes() +
                [&] {
                  size_t total = 0;
                  for (const MlpWeights &expert : weights.experts)
                    total += expert.bytes();
                  return total;
                }(),
            weights.bytes())
            << name << " layer " << l << ": the layer without experts lacks exactly them";
      }
    }
    Golden golden = loadGolden(name);
    for (ExpertCachePolicy policy : {ExpertCachePolicy::Lru, ExpertCachePolicy::Frequency}) {
      EngineOptions small;
      small.expertCacheBytes = 3 * expertBytes; // three experts of the whole model
      small.expertCachePolicy = policy;
      Loaded offloaded = loadModel(dir, small);
      std::vector<float> a, b;
      KvCache cacheA = whole.engine->newCache(), cacheB = offloaded.engine->newCache();
      const size_t prompt = 9;
      ASSERT_TRUE(whole.engine->forward(std::span(golden.ids).first(prompt), cacheA, a).ok());
      ASSERT_TRUE(offloaded.engine->forward(std::span(golden.ids).first(prompt), cacheB, b).ok());
      EXPECT_EQ(a, b) << name << " prefill";
      for (size_t t = prompt; t < golden.ids.size(); ++t) {
        ASSERT_TRUE(whole.engine->forward(std::span(golden.ids).subspan(t, 1), cacheA, a, true).ok());
        ASSERT_TRUE(offloaded.engine->forward(std::span(golden.ids).subspan(t, 1), cacheB, b, true).ok());
        EXPECT_EQ(a, b) << name << " decode position " << t;
      }
      const ExpertCache *cache = offloaded.engine->expertCache();
      ASSERT_NE(cache, nullptr);
      EXPECT_GT(cache->counters().misses, 0);
      EXPECT_LE(cache->peakResidentBytes(), 4 * expertBytes) << name;
      EXPECT_EQ(cache->counters().bytesLoaded > 0, true);
    }
    // Room for every expert: each is loaded once, and a second pass hits.
    EngineOptions roomy;
    roomy.expertCacheBytes = (expertCount + 1) * expertBytes;
    Loaded offloaded = loadModel(dir, roomy);
    std::vector<float> b;
    for (int pass = 0; pass < 2; ++pass) {
      KvCache cache = offloaded.engine->newCache();
      ASSERT_TRUE(offloaded.engine->forward(golden.ids, cache, b).ok());
    }
    const ExpertCacheCounters &counters = offloaded.engine->expertCache()->counters();
    EXPECT_LE(counters.misses, static_cast<int64_t>(expertCount)) << name;
    EXPECT_GE(counters.hits, counters.misses) << name << ": the second pass hits every expert the first loaded";
  }
}

// Which expert goes: LRU evicts the least recent; frequency keeps the one
// asked for most often.
TEST(Engine, ExpertCachePoliciesEvictAsDocumented) {
  const std::string dir = dataDir() + "/hf/mixtral";
  Loaded model = loadModel(dir);
  auto provider = makeCheckpointWeightProvider(model.spec, model.checkpoint);
  MlpWeights one;
  ASSERT_TRUE(provider->loadExpert(0, 0, one).ok());
  const size_t size = one.bytes();
  for (ExpertCachePolicy policy : {ExpertCachePolicy::Lru, ExpertCachePolicy::Frequency}) {
    ExpertCache cache(*provider, 2 * size, policy);
    // 0, 0, 0, 1, then 2: LRU evicts 0 (least recent), frequency evicts 1.
    for (int64_t slot : {0, 0, 0, 1, 2})
      ASSERT_TRUE(cache.get(0, slot).ok());
    EXPECT_EQ(cache.counters().hits, 2);
    EXPECT_EQ(cache.counters().misses, 3);
    ASSERT_TRUE(cache.get(0, 0).ok());
    EXPECT_EQ(cache.counters().hits, policy == ExpertCachePolicy::Frequency ? 3 : 2);
    EXPECT_LE(cache.peakResidentBytes(), 2 * size);
  }
  MlpWeights missing;
  expectErrorContains(provider->loadExpert(0, 99, missing), {"no routed expert 99"});
  EngineOptions offload;
  offload.expertCacheBytes = size;
  Loaded offloaded = loadModel(dir, offload);
  class Nothing : public GradientObserver {
  } nothing;
  std::vector<int32_t> ids = {1, 2, 3};
  auto refused = offloaded.engine->lossGradients(ids, nothing);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("expert cache"), std::string::npos);
}

/// A checkpoint whose routed experts come back rounded to a quant format
/// (RTN by the scalar reference): what a low-bit fallback computes.
class RoundedExperts : public WeightProvider {
public:
  RoundedExperts(std::unique_ptr<WeightProvider> inner, quant::QuantFormat format)
      : inner(std::move(inner)), format(format) {}
  Status loadGlobals(GlobalWeights &globals) override { return inner->loadGlobals(globals); }
  Status loadLayer(int64_t layer, LayerWeights &weights, bool routedExperts) override {
    MOE_RETURN_IF_ERROR(inner->loadLayer(layer, weights, false));
    if (routedExperts)
      for (size_t e = 0; e < weights.experts.size(); ++e)
        MOE_RETURN_IF_ERROR(loadExpert(layer, static_cast<int64_t>(e), weights.experts[e]));
    return Status::success();
  }
  Status loadExpert(int64_t layer, int64_t slot, MlpWeights &expert) override {
    MOE_RETURN_IF_ERROR(inner->loadExpert(layer, slot, expert));
    for (Matrix *m : {&expert.gate, &expert.up, &expert.down}) {
      std::vector<float> values(static_cast<size_t>(m->rows * m->cols));
      for (int64_t r = 0; r < m->rows; ++r)
        m->copyRow(r, values.data() + r * m->cols);
      Matrix rounded;
      rounded.rows = m->rows;
      rounded.cols = m->cols;
      rounded.quantFormat = format;
      rounded.quantStorage.resize(format.matrixBytes(m->rows, m->cols));
      quant::quantizeReference(format, values.data(), m->rows, m->cols, rounded.quantStorage.data());
      rounded.quantData = rounded.quantStorage.data();
      *m = std::move(rounded);
    }
    return Status::success();
  }

private:
  std::unique_ptr<WeightProvider> inner;
  quant::QuantFormat format;
};

// HOBBIT's low-bit fallback: a missing expert no token leans on runs from
// its low-bit copy. Below 0 nothing falls back (logits identical); below 1
// everything does (nothing loaded, every expert call a fallback), and the
// latter equals the model with RTN 4-bit experts exactly (here, and in
// lit/Tools/offload.test against a package moe-quantize made).
TEST(Engine, LowBitFallbackReplacesMissingExperts) {
  const std::string dir = dataDir() + "/hf/mixtral";
  Golden golden = loadGolden("mixtral");
  Loaded whole = loadModel(dir);
  std::vector<float> expected;
  KvCache wholeCache = whole.engine->newCache();
  ASSERT_TRUE(whole.engine->forward(golden.ids, wholeCache, expected).ok());
  for (double below : {0.0, 1.0}) {
    EngineOptions options;
    options.expertCacheBytes = below == 0 ? 100000000 : 1;
    options.expertFallbackFormat = quant::parseQuantFormat("q4_g32_asym");
    options.expertFallbackBelow = below;
    Loaded offloaded = loadModel(dir, options);
    std::vector<float> logits;
    KvCache cache = offloaded.engine->newCache();
    ASSERT_TRUE(offloaded.engine->forward(golden.ids, cache, logits).ok());
    const ExpertCache &experts = *offloaded.engine->expertCache();
    EXPECT_GT(experts.fallbackBytes(), 0u);
    if (below == 0) {
      EXPECT_EQ(logits, expected);
      EXPECT_EQ(experts.counters().fallbacks, 0);
      continue;
    }
    EXPECT_EQ(experts.counters().misses, 0);
    EXPECT_EQ(experts.counters().bytesLoaded, 0u);
    EXPECT_GT(experts.counters().fallbacks, 0);
    EXPECT_NE(logits, expected) << "the low-bit copies ran";
    auto rounded = Engine::create(
        whole.spec, std::make_unique<RoundedExperts>(makeCheckpointWeightProvider(whole.spec, whole.checkpoint),
                                                     *options.expertFallbackFormat));
    ASSERT_TRUE(rounded.ok());
    std::vector<float> reference;
    KvCache referenceCache = (*rounded)->newCache();
    ASSERT_TRUE((*rounded)->forward(golden.ids, referenceCache, reference).ok());
    EXPECT_EQ(logits, reference) << "every expert ran from its RTN copy";
  }
  // At 0.5, over one prefill with a one-byte cache (no expert is resident
  // when its block runs): exactly the (layer, expert) pairs whose largest
  // share of a token's routing weight is below 0.5 fall back, counted here
  // from the routing an observer sees.
  {
    class Shares : public EngineObserver {
    public:
      void onRouter(int64_t layer, int64_t tokens, std::span<const float>, std::span<const int32_t> chosen,
                    std::span<const float> weights, std::span<const int32_t>) override {
        const int64_t K = static_cast<int64_t>(chosen.size()) / tokens;
        for (int64_t t = 0; t < tokens; ++t) {
          double total = 0;
          for (int64_t k = 0; k < K; ++k)
            total += weights[t * K + k];
          for (int64_t k = 0; k < K; ++k) {
            double &most = largest[{layer, chosen[t * K + k]}];
            most = std::max(most, total > 0 ? weights[t * K + k] / total : 1.0);
          }
        }
      }
      std::map<std::pair<int64_t, int64_t>, double> largest;
    } shares;
    KvCache cache = whole.engine->newCache();
    std::vector<float> unused;
    whole.engine->setObserver(&shares);
    ASSERT_TRUE(whole.engine->forward(golden.ids, cache, unused).ok());
    whole.engine->setObserver(nullptr);
    int64_t expectedFallbacks = 0, expectedLoads = 0;
    for (const auto &[expert, most] : shares.largest)
      ++(most < 0.5 ? expectedFallbacks : expectedLoads);
    EngineOptions options;
    options.expertCacheBytes = 1;
    options.expertFallbackFormat = quant::parseQuantFormat("q4_g32_asym");
    Loaded offloaded = loadModel(dir, options);
    KvCache offloadedCache = offloaded.engine->newCache();
    ASSERT_TRUE(offloaded.engine->forward(golden.ids, offloadedCache, unused).ok());
    const ExpertCacheCounters &counters = offloaded.engine->expertCache()->counters();
    EXPECT_GT(expectedFallbacks, 0);
    EXPECT_GT(expectedLoads, 0);
    EXPECT_EQ(counters.fallbacks, expectedFallbacks);
    EXPECT_EQ(counters.misses, expectedLoads);
  }
  EngineOptions noCache;
  noCache.expertFallbackFormat = quant::parseQuantFormat("q4_g32_asym");
  auto refused = Engine::create(whole.spec, makeCheckpointWeightProvider(whole.spec, whole.checkpoint), noCache);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("--expert-fallback needs --expert-cache"), std::string::npos);
  EngineOptions badShare = noCache;
  badShare.expertCacheBytes = 1000;
  badShare.expertFallbackBelow = 1.5;
  refused = Engine::create(whole.spec, makeCheckpointWeightProvider(whole.spec, whole.checkpoint), badShare);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("--expert-fallback-below 1.5"), std::string::npos);
}

TEST(Engine, RejectsTokensOutsideTheVocabulary) {
  Loaded model = loadModel(dataDir() + "/hf/mixtral");
  KvCache cache = model.engine->newCache();
  std::vector<float> logits;
  std::vector<int32_t> ids = {1, 128};
  expectErrorContains(model.engine->forward(ids, cache, logits), {"token id 128", "[0, 128)"});
  expectErrorContains(model.engine->forward({}, cache, logits), {"no tokens"});
}

// Layer at a time (calibration): the same checks, and a layer the model
// does not have or a cache of another engine is named.
TEST(Engine, LayerAtATimeRejectsBadInput) {
  Loaded model = loadModel(dataDir() + "/hf/mixtral");
  std::vector<float> x;
  std::vector<int32_t> ids = {1, 128};
  expectErrorContains(model.engine->embed(ids, x), {"token id 128", "[0, 128)"});
  ids = {1, 2};
  ASSERT_TRUE(model.engine->embed(ids, x).ok());
  KvCache cache = model.engine->newCache();
  const int64_t layers = model.spec.numLayers;
  expectErrorContains(model.engine->forwardLayer(layers, x.data(), 2, cache),
                      {concat("no layer ", layers), concat("has ", layers, ")")});
  expectErrorContains(model.engine->forwardLayer(-1, x.data(), 2, cache), {"no layer -1"});
  KvCache foreign;
  expectErrorContains(model.engine->forwardLayer(0, x.data(), 2, foreign), {"KV cache was not made by this engine"});
  EXPECT_TRUE(model.engine->forwardLayer(0, x.data(), 2, cache).ok());
  expectErrorContains(model.engine->observeMoeBlock(layers, x.data(), 2), {"not a MoE layer"});
}

// Sequential GPTQ's chunk replays run the MoE block alone on what entered
// it: the observer must see exactly what the whole layer showed it (router,
// routed experts, shared expert, residual, block), here on a MoE layer with
// a shared expert.
TEST(Engine, TheMoeBlockAloneShowsTheObserverWhatTheLayerDid) {
  struct Record : EngineObserver {
    std::vector<std::vector<float>> floats;
    std::vector<std::vector<int32_t>> ints;
    void add(std::span<const float> values) { floats.emplace_back(values.begin(), values.end()); }
    void add(std::span<const int32_t> values) { ints.emplace_back(values.begin(), values.end()); }
    void onRouter(int64_t, int64_t, std::span<const float> logits, std::span<const int32_t> chosen,
                  std::span<const float> weights, std::span<const int32_t> slotOfRow) override {
      add(logits), add(chosen), add(weights), add(slotOfRow);
    }
    void onExpert(int64_t, int64_t expert, std::span<const int32_t> tokens, std::span<const float> input,
                  std::span<const float> intermediate, std::span<const float> output) override {
      ints.push_back({static_cast<int32_t>(expert)});
      add(tokens), add(input), add(intermediate), add(output);
    }
    void onSharedExpert(int64_t, int64_t, std::span<const float> input, std::span<const float> intermediate,
                        std::span<const float> output) override {
      add(input), add(intermediate), add(output);
    }
    void onMoeResidual(int64_t, int64_t, std::span<const float> residual, std::span<const float> routed) override {
      add(residual), add(routed);
    }
    void onMoeBlock(int64_t, int64_t, std::span<const float> input, std::span<const float> output) override {
      add(input), add(output);
    }
  };
  Loaded model = loadModel(dataDir() + "/hf/deepseek_v3");
  const int64_t H = model.spec.hiddenSize;
  const int64_t layer = 1; // layer 0 is dense (first_k_dense_replace)
  ASSERT_EQ(model.spec.layers[layer].mlp, MlpKind::Moe);
  std::vector<int32_t> ids = {1, 7, 42, 3, 99};
  const int64_t T = static_cast<int64_t>(ids.size());
  std::vector<float> x;
  ASSERT_TRUE(model.engine->embed(ids, x).ok());
  KvCache cache = model.engine->newCache();
  ASSERT_TRUE(model.engine->forwardLayer(0, x.data(), T, cache).ok());
  const std::vector<float> enteringLayer = x;
  Record whole, alone;
  std::vector<float> moeInput(static_cast<size_t>(T * H), -1.0f);
  model.engine->setObserver(&whole);
  ASSERT_TRUE(model.engine->forwardLayer(layer, x.data(), T, cache, moeInput.data()).ok());
  model.engine->setObserver(&alone);
  ASSERT_TRUE(model.engine->observeMoeBlock(layer, moeInput.data(), T).ok());
  model.engine->setObserver(nullptr);
  EXPECT_GE(whole.floats.size(), 10u); // router, experts, shared expert, residual, block
  EXPECT_EQ(alone.floats, whole.floats);
  EXPECT_EQ(alone.ints, whole.ints);
  // What entered the block is not the layer's input: the attention ran.
  EXPECT_NE(moeInput, enteringLayer);
  expectErrorContains(model.engine->observeMoeBlock(0, moeInput.data(), T), {"not a MoE layer"});
}

/// Runs nothing of its own; attached, it sends prefill through the serial
/// loop over experts (observers see experts one at a time, in order).
class PassiveObserver : public EngineObserver {};

TEST(Engine, PrefillExpertsAsPoolTasksMatchTheSerialLoop) {
  if (kernels::poolThreads() < 2)
    GTEST_SKIP() << "one thread: prefill runs the serial loop only";
  // Routed experts (tiny-mixtral), routed and shared (tiny-deepseek); the
  // packages' group kernels: Tools/ux.test's thread counts.
  for (const char *name : {"tiny-mixtral", "tiny-deepseek"}) {
    Loaded model = loadModel(dataDir() + "/fixtures/" + name);
    std::vector<int32_t> ids(96);
    for (size_t i = 0; i < ids.size(); ++i)
      ids[i] = static_cast<int32_t>((i * 37 + 11) % 2000);
    std::vector<float> tasks, serial;
    KvCache first = model.engine->newCache();
    ASSERT_TRUE(model.engine->forward(ids, first, tasks).ok());
    PassiveObserver observer;
    model.engine->setObserver(&observer);
    KvCache second = model.engine->newCache();
    ASSERT_TRUE(model.engine->forward(ids, second, serial).ok());
    model.engine->setObserver(nullptr);
    EXPECT_EQ(tasks, serial) << name << ": bitwise identical";
  }
}

TEST(Engine, ResultsAreIdenticalWhateverTheThreadCount) {
  Loaded model = loadModel(dataDir() + "/hf/deepseek_v3");
  Golden golden = loadGolden("deepseek_v3");
  std::vector<float> one, two;
  openblas_set_num_threads(1);
  KvCache cacheOne = model.engine->newCache();
  ASSERT_TRUE(model.engine->forward(golden.ids, cacheOne, one).ok());
  openblas_set_num_threads(2); // a caller's setting the engine must not follow
  KvCache cacheTwo = model.engine->newCache();
  const bool ran = model.engine->forward(golden.ids, cacheTwo, two).ok();
  openblas_set_num_threads(1); // as the engine's pool keeps it
  stopBlasWorkers();
  ASSERT_TRUE(ran);
  EXPECT_EQ(one, two) << "bitwise identical";
}

namespace {

/// Records what the hooks see.
class RecordingObserver : public EngineObserver {
public:
  void onRouter(int64_t layer, int64_t tokens, std::span<const float> logits, std::span<const int32_t> chosen,
                std::span<const float> weights, std::span<const int32_t>) override {
    routerTokens += tokens;
    for (int32_t expert : chosen)
      ++expertChoices[{layer, expert}];
    EXPECT_EQ(chosen.size(), weights.size());
    EXPECT_EQ(logits.size() % static_cast<size_t>(tokens), 0u);
  }
  void onExpert(int64_t layer, int64_t expert, std::span<const int32_t> tokenIndices, std::span<const float> input,
                std::span<const float> intermediate, std::span<const float> output) override {
    expertTokens[{layer, expert}] += static_cast<int64_t>(tokenIndices.size());
    EXPECT_EQ(input.size(), output.size());
    EXPECT_EQ(intermediate.size() % tokenIndices.size(), 0u);
  }
  void onMoeBlock(int64_t, int64_t tokens, std::span<const float> input, std::span<const float> output) override {
    ++blocks;
    EXPECT_EQ(input.size(), output.size());
    (void)tokens;
  }
  void onLayerOutput(int64_t, int64_t, std::span<const float>) override { ++layers; }

  int64_t routerTokens = 0, blocks = 0, layers = 0;
  std::map<std::pair<int64_t, int64_t>, int64_t> expertChoices, expertTokens;
};

} // namespace

TEST(Engine, ObserversSeeEveryRoutingDecisionAndChangeNothing) {
  Loaded model = loadModel(dataDir() + "/hf/qwen2_moe");
  Golden golden = loadGolden("qwen2_moe");
  RecordingObserver observer;
  model.engine->setObserver(&observer);
  KvCache cache = model.engine->newCache();
  std::vector<float> logits;
  ASSERT_TRUE(model.engine->forward(golden.ids, cache, logits).ok());
  model.engine->setObserver(nullptr);
  const int64_t T = static_cast<int64_t>(golden.ids.size()), moeLayers = model.spec.numMoeLayers();
  EXPECT_EQ(observer.routerTokens, T * moeLayers);
  EXPECT_EQ(observer.blocks, moeLayers);
  EXPECT_EQ(observer.layers, model.spec.numLayers);
  EXPECT_EQ(observer.expertChoices, observer.expertTokens) << "each choice ran its expert once";
  int64_t total = 0;
  for (const auto &[key, count] : observer.expertTokens)
    total += count;
  EXPECT_EQ(total, T * moeLayers * model.spec.router.topK);
  EXPECT_LE(maxAbsDifference(logits, golden.logits.data(), logits.size()), 1e-3f);
}

TEST(Engine, MaskedExpertsAreNeverChosenWhateverTheirCorrectionBias) {
  // DeepSeek-V3 chooses by sigmoid(logit) + correction bias. A masked
  // expert's logit is -inf, so its sigmoid is 0 and, with a large bias, it
  // used to take a top-k slot with weight 0: the subset NAEE scored was not
  // the routing of the sliced model. Give expert 3 of layer 1 a bias that
  // wins every token, then mask it.
  TempDir dir;
  const std::string source = dataDir() + "/hf/deepseek_v3";
  for (const auto &entry : std::filesystem::directory_iterator(source))
    std::filesystem::copy_file(entry.path(), dir.file(entry.path().filename().string()));
  std::string shard;
  for (const auto &entry : std::filesystem::directory_iterator(dir.path()))
    if (entry.path().extension() == ".safetensors")
      shard = entry.path().string();
  {
    auto file = SafetensorsFile::open(shard);
    ASSERT_TRUE(file.ok()) << file.status().message();
    const TensorInfo *bias = (*file)->find("model.layers.1.mlp.gate.e_score_correction_bias");
    ASSERT_NE(bias, nullptr);
    ASSERT_EQ(bias->dtype, DType::BF16);
    std::fstream patch(shard, std::ios::in | std::ios::out | std::ios::binary);
    uint64_t headerLength = 0; // the data buffer starts after it
    patch.read(reinterpret_cast<char *>(&headerLength), 8);
    const uint64_t offset = 8 + headerLength + bias->dataBegin + 3 * 2; // expert 3
    patch.seekp(static_cast<std::streamoff>(offset));
    const uint8_t ten[2] = {0x20, 0x41}; // bf16 10.0
    patch.write(reinterpret_cast<const char *>(ten), 2);
  }
  Golden golden = loadGolden("deepseek_v3");
  auto choices = [&](EngineOptions options) {
    Loaded model = loadModel(dir.path(), options);
    RecordingObserver observer;
    model.engine->setObserver(&observer);
    KvCache cache = model.engine->newCache();
    std::vector<float> logits;
    EXPECT_TRUE(model.engine->forward(golden.ids, cache, logits).ok());
    for (float value : logits)
      EXPECT_TRUE(std::isfinite(value));
    return observer.expertChoices;
  };
  const int64_t T = static_cast<int64_t>(golden.ids.size());
  const std::pair<int64_t, int64_t> biased = {1, 3};
  EXPECT_EQ(choices({})[biased], T) << "the bias makes every token choose expert 3";
  EngineOptions masked;
  masked.maskedExperts = {{1, {3}}};
  auto chosen = choices(masked);
  EXPECT_EQ(chosen.count(biased), 0u) << "a masked expert is never chosen";
  int64_t layer1 = 0;
  for (const auto &[key, count] : chosen)
    layer1 += key.first == 1 ? count : 0;
  EXPECT_EQ(layer1, 2 * T) << "every token still gets top-2 present experts";
}

TEST(Engine, MoeResidualHookGivesTheResidualAndTheRoutedOutputAlone) {
  // EASY-EP's token contribution needs the residual stream entering the MoE
  // block and the routed experts' output without the shared experts
  // (DeepSeek-V2 has both). Checked against the other hooks: the routed
  // output is the sum of g x E(x) over the chosen experts, and the residual
  // plus the whole block output is the layer's output.
  class Check : public EngineObserver {
  public:
    int64_t H = 0, K = 0;
    std::vector<float> weights, routedSum, residual, routedHook, block;
    std::vector<int32_t> chosen;
    std::map<int64_t, std::vector<float>> layerOutput;
    int64_t calls = 0, layer = -1;
    void onRouter(int64_t l, int64_t tokens, std::span<const float>, std::span<const int32_t> c,
                  std::span<const float> w, std::span<const int32_t>) override {
      if (l != layer)
        return;
      chosen.assign(c.begin(), c.end());
      weights.assign(w.begin(), w.end());
      K = static_cast<int64_t>(c.size()) / tokens;
      routedSum.assign(static_cast<size_t>(tokens * H), 0.0f);
    }
    void onExpert(int64_t l, int64_t expert, std::span<const int32_t> tokenIndices, std::span<const float>,
                  std::span<const float>, std::span<const float> output) override {
      if (l != layer)
        return;
      for (size_t r = 0; r < tokenIndices.size(); ++r) {
        const int32_t t = tokenIndices[r];
        float g = 0;
        for (int64_t k = 0; k < K; ++k)
          if (chosen[t * K + k] == expert)
            g += weights[t * K + k];
        for (int64_t i = 0; i < H; ++i)
          routedSum[t * H + i] += g * output[r * H + i];
      }
    }
    void onMoeResidual(int64_t l, int64_t, std::span<const float> h, std::span<const float> r) override {
      if (l != layer)
        return;
      ++calls;
      residual.assign(h.begin(), h.end());
      routedHook.assign(r.begin(), r.end());
    }
    void onMoeBlock(int64_t l, int64_t, std::span<const float>, std::span<const float> output) override {
      if (l == layer)
        block.assign(output.begin(), output.end());
    }
    void onLayerOutput(int64_t l, int64_t, std::span<const float> hidden) override {
      layerOutput[l].assign(hidden.begin(), hidden.end());
    }
  } check;
  Loaded model = loadModel(dataDir() + "/hf/deepseek_v2");
  ASSERT_GT(model.spec.layers[1].shared.intermediateSize, 0);
  check.H = model.spec.hiddenSize;
  check.layer = 1;
  Golden golden = loadGolden("deepseek_v2");
  model.engine->setObserver(&check);
  KvCache cache = model.engine->newCache();
  std::vector<float> logits;
  ASSERT_TRUE(model.engine->forward(golden.ids, cache, logits).ok());
  model.engine->setObserver(nullptr);
  ASSERT_EQ(check.calls, 1);
  ASSERT_EQ(check.routedHook.size(), check.routedSum.size());
  float routedError = 0, residualError = 0, sharedPart = 0;
  for (size_t i = 0; i < check.routedHook.size(); ++i) {
    routedError = std::max(routedError, std::fabs(check.routedHook[i] - check.routedSum[i]));
    sharedPart = std::max(sharedPart, std::fabs(check.block[i] - check.routedHook[i]));
    residualError = std::max(residualError, std::fabs(check.residual[i] + check.block[i] - check.layerOutput[1][i]));
  }
  EXPECT_LT(routedError, 1e-5f);
  EXPECT_GT(sharedPart, 1e-3f) << "the shared expert is not in the routed output";
  EXPECT_LT(residualError, 1e-5f);
}

TEST(MoeBlock, MaskedErrorsFromProductsEqualTheEngineRecomputingTheBlock) {
  // NAEE's search evaluates a masked routing from products of expert
  // outputs computed once. For every family's router (softmax with and
  // without renormalisation, group-limited sigmoid with correction bias,
  // sparsemixer) and shared experts, gated or not, it must give the error
  // the engine's MoE block gives when run with the mask, also under
  // dynamic skipping.
  class Blocks : public EngineObserver {
  public:
    void onMoeBlock(int64_t layer, int64_t, std::span<const float> input, std::span<const float> output) override {
      if (inputs.count(layer))
        return;
      inputs[layer].assign(input.begin(), input.end());
      outputs[layer].assign(output.begin(), output.end());
    }
    std::map<int64_t, std::vector<float>> inputs, outputs;
  };
  for (const char *family :
       {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2_grouped", "deepseek_v3", "phimoe"}) {
    SCOPED_TRACE(family);
    const std::string dir = dataDir() + "/hf/" + family;
    Loaded model = loadModel(dir);
    Blocks blocks;
    Golden golden = loadGolden(family);
    model.engine->setObserver(&blocks);
    KvCache cache = model.engine->newCache();
    std::vector<float> logits;
    ASSERT_TRUE(model.engine->forward(golden.ids, cache, logits).ok());
    ASSERT_FALSE(blocks.inputs.empty());
    auto provider = makeCheckpointWeightProvider(model.spec, model.checkpoint);
    for (const auto &[layer, input] : blocks.inputs) {
      LayerWeights weights;
      ASSERT_TRUE(provider->loadLayer(layer, weights).ok());
      const LayerSpec &layerSpec = model.spec.layers[static_cast<size_t>(layer)];
      const std::vector<float> &output = blocks.outputs[layer];
      // The cached output perturbed, so the unmasked error is not zero.
      std::vector<float> target(output);
      for (size_t i = 0; i < target.size(); ++i)
        target[i] += 0.01f * static_cast<float>((i * 7919) % 13) - 0.06f;
      const BlockSamplesView samples{input.data(), target.data(),
                                     static_cast<int64_t>(input.size()) / model.spec.hiddenSize};
      const int64_t E = weights.router.rows, K = model.spec.router.topK;
      for (double skip : {0.0, 0.3}) {
        weights.routing.skipThreshold = skip;
        MaskedBlockErrors errors(model.spec, layerSpec, weights, samples);
        std::vector<float> scratch;
        // No mask, each expert alone, and masks of E - K experts.
        std::vector<std::set<int64_t>> masks = {{}};
        for (int64_t e = 0; e < E; ++e)
          masks.push_back({e});
        for (int64_t start = 0; start < E; ++start) {
          std::set<int64_t> many;
          for (int64_t i = 0; i < E - K; ++i)
            many.insert((start + 3 * i) % E);
          if (static_cast<int64_t>(many.size()) == E - K)
            masks.push_back(many);
        }
        for (const std::set<int64_t> &mask : masks) {
          std::vector<uint8_t> flags(static_cast<size_t>(E), 0);
          for (int64_t e : mask)
            flags[static_cast<size_t>(e)] = 1;
          const double engine = moeBlockOutputError(model.spec, layerSpec, weights, samples, &mask, scratch);
          const double fast = std::sqrt(errors.squaredError(flags.data()));
          EXPECT_NEAR(fast, engine, 1e-4 * engine + 1e-6)
              << "layer " << layer << ", skip " << skip << ", " << mask.size() << " masked";
        }
      }
    }
  }
}

// A device's mirror of a KV cache counts the cache's rows, so two caches
// must never share one: a copy starts without it, a move takes it along.
TEST(KvCache, ACopyStartsWithoutTheDeviceMirror) {
  moe::KvCache a;
  a.length = 3;
  a.keys = {{1.0f, 2.0f, 3.0f}};
  a.values = {{4.0f, 5.0f, 6.0f}};
  a.device = std::make_shared<int>(7);
  moe::KvCache copied(a);
  EXPECT_EQ(copied.length, 3);
  EXPECT_EQ(copied.keys, a.keys);
  EXPECT_EQ(copied.values, a.values);
  EXPECT_EQ(copied.device, nullptr);
  moe::KvCache assigned;
  assigned.device = std::make_shared<int>(8);
  assigned = a;
  EXPECT_EQ(assigned.keys, a.keys);
  EXPECT_EQ(assigned.device, nullptr);
  moe::KvCache moved(std::move(a));
  EXPECT_NE(moved.device, nullptr);
}

TEST(AttentionKernels, QueriesTogetherGiveEachQuerysOwnBits) {
  // Prefill attention takes up to four queries at once (keys and values
  // read once). Each query's scores and weighted values must be the bits
  // it gets alone, on odd key counts, head widths over 64 and causal
  // lengths that differ per query; and near a double reference.
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (int64_t dim : {5, 16, 40, 48, 64, 70, 130}) {
    for (int64_t total : {1, 3, 17, 31, 32, 33, 64, 100}) {
      const int64_t qStride = dim + 3, stride = total + 2;
      std::vector<float> q(static_cast<size_t>(4 * qStride)), keysT(static_cast<size_t>(dim * stride)),
          values(static_cast<size_t>(total * (dim + 1)));
      for (float &v : q)
        v = normal(rng);
      for (float &v : keysT)
        v = normal(rng);
      for (float &v : values)
        v = normal(rng);
      for (int count = 1; count <= 4; ++count) {
        const int64_t visibleAll = total;
        std::vector<float> together(static_cast<size_t>(4 * total), -1.0f), alone(together);
        kernels::scoresOfTransposedKeys(q.data(), qStride, count, keysT.data(), stride, dim, visibleAll, 0.25f,
                                        together.data(), total);
        for (int i = 0; i < count; ++i) {
          kernels::scoresOfTransposedKeys(q.data() + i * qStride, qStride, 1, keysT.data(), stride, dim, visibleAll,
                                          0.25f, alone.data() + i * total, total);
          for (int64_t s = 0; s < total; ++s) {
            double exact = 0;
            for (int64_t d = 0; d < dim; ++d)
              exact += static_cast<double>(q[i * qStride + d]) * keysT[d * stride + s];
            EXPECT_NEAR(alone[i * total + s], 0.25 * exact, 1e-5 * (1 + dim)) << dim << " " << total;
          }
        }
        EXPECT_EQ(together, alone) << dim << " " << total << " " << count;
        // Causal lengths: query i sees total - (count - 1 - i) positions.
        int64_t visible[4];
        for (int i = 0; i < count; ++i)
          visible[i] = std::max<int64_t>(1, total - (count - 1 - i));
        std::vector<float> outTogether(static_cast<size_t>(4 * (dim + 2)), -1.0f), outAlone(outTogether);
        kernels::weightedRows(together.data(), total, visible, count, values.data(), dim + 1, dim, outTogether.data(),
                              dim + 2);
        for (int i = 0; i < count; ++i) {
          kernels::weightedRows(together.data() + i * total, total, visible + i, 1, values.data(), dim + 1, dim,
                                outAlone.data() + i * (dim + 2), dim + 2);
          for (int64_t d = 0; d < dim; ++d) {
            double exact = 0;
            for (int64_t s = 0; s < visible[i]; ++s)
              exact += static_cast<double>(together[i * total + s]) * values[s * (dim + 1) + d];
            EXPECT_NEAR(outAlone[i * (dim + 2) + d], exact, 1e-4 * (1 + total)) << dim << " " << total;
          }
        }
        EXPECT_EQ(outTogether, outAlone) << dim << " " << total << " " << count;
      }
    }
  }
}

TEST(Softmax, TheVectorLanesAreWithinAFewUlpsOfTheExactValue) {
  // The reference: e^(x - max) in double of the same f32 differences both
  // take, normalised in double. The vector softmax's partial sums make it
  // at least as close as the sequential scalar sum on long rows.
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 6.0f);
  for (int64_t count : {1, 7, 16, 17, 33, 300, 1024}) {
    std::vector<float> values(static_cast<size_t>(count));
    for (float &v : values)
      v = normal(rng);
    if (count > 2) {
      values[1] = -std::numeric_limits<float>::infinity(); // a masked row or position: exactly 0
      values[2] = values[0] - 100.0f;                      // e^x below f32's normal range
    }
    const float maximum = *std::max_element(values.begin(), values.end());
    std::vector<double> exact(values.size());
    double total = 0;
    for (size_t i = 0; i < values.size(); ++i)
      total += exact[i] = std::exp(static_cast<double>(values[i] - maximum));
    std::vector<float> fast = values, scalar = values;
    kernels::softmax(fast.data(), count);
    kernels::softmaxScalar(scalar.data(), count);
    double fastWorst = 0, scalarWorst = 0;
    for (size_t i = 0; i < values.size(); ++i) {
      const double want = exact[i] / total;
      if (want < 1e-36) {
        EXPECT_LE(std::fabs(fast[i] - want), 1e-44) << count << " " << i;
        continue;
      }
      fastWorst = std::max(fastWorst, std::fabs(fast[i] - want) / want);
      scalarWorst = std::max(scalarWorst, std::fabs(scalar[i] - want) / want);
    }
    EXPECT_LT(fastWorst, 4e-7) << count;
    EXPECT_LE(fastWorst, std::max(scalarWorst, 2.4e-7)) << count << ": no worse than the C library's";
    if (count > 2)
      EXPECT_EQ(fast[1], 0.0f);
    // A NaN anywhere makes the row NaN, as the scalar softmax does.
    std::vector<float> poisoned = values;
    poisoned[static_cast<size_t>(count - 1)] = std::numeric_limits<float>::quiet_NaN();
    kernels::softmax(poisoned.data(), count);
    EXPECT_TRUE(std::isnan(poisoned[0])) << count;
  }
}
