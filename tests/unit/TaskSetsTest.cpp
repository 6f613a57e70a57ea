//===- TaskSetsTest.cpp - Task-adaptive expert sets with known answers ----===//
//
// Part of moec. The stored form round-trips and bad fields are named; the
// prompt signature is PreMoe's pattern as calibration records it (the
// same tokens give the same vector); retrieval picks the nearest set; a
// set chosen at load leaves its other experts unloaded and computes what
// the fully loaded, masked engine computes.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/TaskSets.h"
#include "moe/Calibration/Statistics.h"
#include "moe/Runtime/Description.h"
#include "moe/Runtime/Model.h"

#include "TestSupport.h"

#include <cmath>
#include <filesystem>
#include <fstream>

using namespace moe;
using namespace moe::testing;

namespace {

TaskExpertSet makeSet(const std::string &name, std::vector<double> signature,
                      std::map<int64_t, std::set<int64_t>> masked) {
  TaskExpertSet set;
  set.name = name;
  set.signatures[1] = std::move(signature);
  set.tokens = 100;
  set.masked = std::move(masked);
  return set;
}

TEST(TaskSets, JsonRoundTripsAndNamesBadFields) {
  std::vector<TaskExpertSet> sets = {makeSet("fiction", {0.5, 0, 1.25}, {{0, {1}}, {2, {0, 2}}}),
                                     makeSet("press", {0, 2, 0}, {})};
  Expected<std::vector<TaskExpertSet>> back = taskSetsFromJson(taskSetsToJson(sets), "p.moepkg");
  ASSERT_TRUE(back) << back.status().message();
  ASSERT_EQ(back->size(), 2u);
  EXPECT_EQ((*back)[0].name, "fiction");
  EXPECT_EQ((*back)[0].signatures, sets[0].signatures);
  EXPECT_EQ((*back)[0].masked, sets[0].masked);
  EXPECT_EQ((*back)[1].tokens, 100);

  nlohmann::json bad = taskSetsToJson(sets);
  bad[1]["masked"] = {{"x", {1}}};
  Expected<std::vector<TaskExpertSet>> failed = taskSetsFromJson(bad, "p.moepkg");
  ASSERT_FALSE(failed);
  EXPECT_NE(failed.status().message().find("p.moepkg: task_sets[1].masked"), std::string::npos)
      << failed.status().message();
  bad = taskSetsToJson(sets);
  bad[0].erase("signatures");
  failed = taskSetsFromJson(bad, "p.moepkg");
  ASSERT_FALSE(failed);
  EXPECT_NE(failed.status().message().find("task_sets[0]: expected"), std::string::npos);
}

TEST(TaskSets, NearestSetInL2) {
  std::vector<TaskExpertSet> sets = {makeSet("a", {1, 0, 0}, {}), makeSet("b", {0, 1, 0}, {}),
                                     makeSet("c", {0, 0, 1}, {})};
  EXPECT_EQ(nearestTaskSet(sets, {{1, {0.1, 0.9, 0.2}}}), 1u);
  EXPECT_EQ(nearestTaskSet(sets, {{1, {0.1, 0.2, 0.3}}}), 2u);
  EXPECT_EQ(nearestTaskSet(sets, {{1, {0.5, 0.5, 0}}}), 0u); // a tie goes to the first
  // Over several layers the distances add up.
  sets[0].signatures[2] = {5, 5};
  sets[1].signatures[2] = {0, 0};
  sets[2].signatures[2] = {0, 0};
  EXPECT_EQ(nearestTaskSet(sets, {{1, {0.9, 0.1, 0}}, {2, {0, 0}}}), 1u);
  EXPECT_EQ(signatureLayers(sets, TaskSignatureScope::FirstLayer), (std::set<int64_t>{1}));
  EXPECT_EQ(signatureLayers(sets, TaskSignatureScope::AllLayers), (std::set<int64_t>{1, 2}));
}

// Validation against a described model (tiny-deepseek: layer 0 dense,
// layers 1-3 MoE with 8 experts, top-2).
TEST(TaskSets, ValidationNamesTheSetAndTheField) {
  Expected<LoadedModel> model = loadModel(dataDir() + "/fixtures/tiny-deepseek");
  ASSERT_TRUE(model) << model.status().message();
  ModelDescription description;
  description.spec = model->spec;
  description.layers.resize(static_cast<size_t>(model->spec.numLayers));
  for (int64_t l = 1; l < model->spec.numLayers; ++l)
    description.layers[static_cast<size_t>(l)].experts.resize(8);
  auto check = [&](TaskExpertSet set) { return validateTaskSets({std::move(set)}, description, "m.moepkg").message(); };
  TaskExpertSet good = makeSet("fiction", std::vector<double>(8, 0.1), {{1, {0, 1, 2, 3, 4, 5}}});
  EXPECT_EQ(check(good), "");
  TaskExpertSet dense = good;
  dense.signatures[0] = std::vector<double>(8, 0.0);
  EXPECT_EQ(check(dense), "m.moepkg: task set 'fiction': signature layer 0 is not a MoE layer");
  TaskExpertSet shortSignature = good;
  shortSignature.signatures[1].pop_back();
  EXPECT_EQ(check(shortSignature),
            "m.moepkg: task set 'fiction': the signature of layer 1 has 7 entries; the layer has 8 router rows");
  TaskExpertSet moreLayers = good;
  moreLayers.name = "press";
  moreLayers.signatures[2] = std::vector<double>(8, 0.0);
  EXPECT_EQ(validateTaskSets({good, moreLayers}, description, "m.moepkg").message(),
            "m.moepkg: task set 'press': has a signature of layer 2, task set 'fiction' does not; every set needs "
            "the same layers");
  TaskExpertSet tooMany = good;
  tooMany.masked[2] = {0, 1, 2, 3, 4, 5, 6};
  EXPECT_EQ(check(tooMany), "m.moepkg: task set 'fiction': layer 2 keeps 1 experts, fewer than its top-k 2");
  TaskExpertSet outOfRange = good;
  outOfRange.masked[3] = {8};
  EXPECT_EQ(check(outOfRange), "m.moepkg: task set 'fiction': layer 3 masks row 8; the layer has 8 experts");
  TaskExpertSet reserved = good;
  reserved.name = "auto";
  EXPECT_NE(check(reserved).find("not auto or all"), std::string::npos);
  EXPECT_NE(validateTaskSets({good, good}, description, "m.moepkg").message().find("two task sets are named"),
            std::string::npos);
}

// The prompt's signature is the pattern calibration records as the top-1
// logit sum over its tokens: the same tokens, the same vector.
TEST(TaskSets, SignatureIsThePatternCalibrationRecords) {
  Expected<LoadedModel> model = loadModel(dataDir() + "/fixtures/tiny-deepseek");
  ASSERT_TRUE(model) << model.status().message();
  auto streams = readEvalData(dataDir() + "/brown/heldout.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams);
  const int64_t L = 96;
  EvalStream one = (*streams)[0];
  one.ids.resize(static_cast<size_t>(L + 1)); // one window of L inputs
  CalibrationOptions options;
  options.sequenceLength = L;
  Expected<CalibrationResult> stats = calibrate(*model->engine, {one}, options);
  ASSERT_TRUE(stats) << stats.status().message();
  ASSERT_EQ(stats->layers.size(), 3u); // layers 1-3
  std::set<int64_t> layers;
  for (const LayerStatistics &layer : stats->layers)
    layers.insert(layer.layer);
  const std::span<const int32_t> window = std::span<const int32_t>(one.ids).first(static_cast<size_t>(L));
  Expected<std::map<int64_t, std::vector<double>>> signatures = routingSignatures(*model->engine, window, layers);
  ASSERT_TRUE(signatures) << signatures.status().message();
  for (const LayerStatistics &layer : stats->layers) {
    const std::vector<double> &signature = signatures->at(layer.layer);
    ASSERT_EQ(signature.size(), layer.topLogitSum.size());
    double total = 0;
    for (size_t e = 0; e < signature.size(); ++e) {
      EXPECT_NEAR(signature[e], layer.topLogitSum[e] / static_cast<double>(layer.tokens), 1e-5)
          << "layer " << layer.layer << " expert " << e;
      total += std::abs(signature[e]);
    }
    EXPECT_GT(total, 0.0);
  }
  // Measured without the engine's masks, which come back after.
  ASSERT_TRUE(model->engine->setMaskedExperts({{1, {0, 1, 2}}, {3, {4}}}).ok());
  Expected<std::map<int64_t, std::vector<double>>> masked = routingSignatures(*model->engine, window, layers);
  ASSERT_TRUE(masked);
  EXPECT_EQ(*masked, *signatures);
  EXPECT_EQ(model->engine->maskedExpertSets().at(1), (std::set<int64_t>{0, 1, 2}));
}

// A set chosen at load: its other experts are never loaded, the logits are
// the fully loaded masked engine's, and they cannot be unmasked later.
TEST(TaskSets, ExpertsOutsideTheSetAreNotLoaded) {
  const std::map<int64_t, std::set<int64_t>> masked = {{1, {0, 3, 5}}, {2, {1, 2, 6, 7}}, {3, {4}}};
  EngineOptions whole;
  whole.maskedExperts = masked;
  EngineOptions partial = whole;
  partial.loadMaskedExperts = false;
  Expected<LoadedModel> a = loadModel(dataDir() + "/fixtures/tiny-deepseek", whole);
  Expected<LoadedModel> b = loadModel(dataDir() + "/fixtures/tiny-deepseek", partial);
  ASSERT_TRUE(a && b);
  const std::vector<int32_t> tokens = {1, 17, 230, 44, 9, 311, 5, 80, 12, 64};
  KvCache ca = a->engine->newCache(), cb = b->engine->newCache();
  std::vector<float> la, lb;
  ASSERT_TRUE(a->engine->forward(tokens, ca, la).ok());
  ASSERT_TRUE(b->engine->forward(tokens, cb, lb).ok());
  EXPECT_EQ(la, lb);
  EXPECT_LT(b->engine->layerCache().peakResidentBytes(), a->engine->layerCache().peakResidentBytes());
  Status unmask = b->engine->setMaskedExperts({{1, {0, 3}}, {2, {1, 2, 6, 7}}, {3, {4}}});
  ASSERT_FALSE(unmask.ok());
  EXPECT_EQ(unmask.message(), "masked experts: expert 5 of layer 1 was not loaded (the task set chosen at load "
                              "leaves it out)");
  EXPECT_TRUE(b->engine->setMaskedExperts({{1, {0, 1, 3, 5}}, {2, {1, 2, 6, 7}}, {3, {4}}}).ok());
}

// Group-limited routing keeps its groups under a mask, so the kept groups
// can hold fewer than top-k live rows and top-k then picks a masked one.
// DeepSeek-V3's tiny checkpoint with one group kept (4 groups of 2, top-2)
// and one live expert per group: that choice has weight 0 and is not run,
// so an expert a set left unloaded is never touched.
TEST(TaskSets, MaskedRowsChosenByGroupsAreNotRun) {
  const std::string dir = ::testing::TempDir() + "/moec-deepseek-one-group";
  std::filesystem::remove_all(dir);
  std::filesystem::copy(dataDir() + "/hf/deepseek_v3", dir);
  {
    std::ifstream in(dir + "/config.json");
    nlohmann::json config = nlohmann::json::parse(in);
    config["topk_group"] = 1;
    std::ofstream(dir + "/config.json") << config.dump();
  }
  const std::map<int64_t, std::set<int64_t>> masked = {{1, {0, 2, 4, 6}}, {2, {0, 2, 4, 6}}};
  EngineOptions whole;
  whole.maskedExperts = masked;
  EngineOptions partial = whole;
  partial.loadMaskedExperts = false;
  Expected<LoadedModel> a = loadModel(dir, whole);
  Expected<LoadedModel> b = loadModel(dir, partial);
  ASSERT_TRUE(a && b) << (a ? b.status().message() : a.status().message());
  const std::vector<int32_t> tokens = {1, 17, 23, 44, 9, 31, 5, 80, 12, 64};
  for (bool decode : {false, true}) {
    KvCache ca = a->engine->newCache(), cb = b->engine->newCache();
    std::vector<float> la, lb;
    if (!decode) {
      ASSERT_TRUE(a->engine->forward(tokens, ca, la).ok());
      ASSERT_TRUE(b->engine->forward(tokens, cb, lb).ok());
    } else {
      for (size_t t = 0; t < tokens.size(); ++t) {
        ASSERT_TRUE(a->engine->forward(std::span(tokens).subspan(t, 1), ca, la, true).ok());
        ASSERT_TRUE(b->engine->forward(std::span(tokens).subspan(t, 1), cb, lb, true).ok());
      }
    }
    EXPECT_EQ(la, lb) << (decode ? "decode" : "prefill");
    for (float value : lb)
      ASSERT_TRUE(std::isfinite(value));
  }
  // One live expert per token and layer runs: the masked second choice does not.
  EXPECT_EQ(b->engine->routingCounters().expertCalls, b->engine->routingCounters().routedTokens);
  std::filesystem::remove_all(dir);
}

} // namespace
