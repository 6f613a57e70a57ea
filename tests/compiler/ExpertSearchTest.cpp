//===- ExpertSearchTest.cpp - EEP's pruning search finds known answers ----===//
//
// Part of moec. A model with two experts made harmful (their down
// projections scaled 32x, which routing cannot see): the search must drop
// exactly those, the routing-frequency candidate does not, the same seed
// gives the same search, and the reported loss is the engine's loss of the
// masked model. A layer whose every expert is made harmful (x8), which no
// keep-set can mend: the merge stage must shrink the kept experts.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/ExpertSearch.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Runtime/Model.h"
#include "moe/Support/File.h"
#include "moe/Transforms/ExpertMix.h"

#include "../unit/TestSupport.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

using namespace moe;
using namespace moe::testing;

namespace {

/// tiny-mixtral copied into `dir` with the w2 of (layer, expert) pairs
/// multiplied by 2^shift (added to each non-zero bf16 exponent).
void writeHarmedFixture(const std::string &dir, const std::vector<std::pair<int, int>> &harmed, int shift = 5) {
  const std::string source = dataDir() + "/fixtures/tiny-mixtral";
  for (const char *name : {"config.json", "tokenizer.json", "tokenizer_config.json"})
    std::filesystem::copy_file(source + "/" + name, dir + "/" + name);
  Expected<std::string> bytes = readWholeFile(source + "/model.safetensors");
  ASSERT_TRUE(bytes.ok()) << bytes.status().message();
  std::string data = bytes.take();
  auto header = parseSafetensorsHeader(reinterpret_cast<const uint8_t *>(data.data()), data.size(), "fixture");
  ASSERT_TRUE(header.ok()) << header.status().message();
  for (auto [layer, expert] : harmed) {
    const std::string name =
        "model.layers." + std::to_string(layer) + ".block_sparse_moe.experts." + std::to_string(expert) + ".w2.weight";
    const TensorInfo *tensor = header->find(name);
    ASSERT_NE(tensor, nullptr) << name;
    ASSERT_EQ(tensor->dtype, DType::BF16);
    for (uint64_t at = header->dataOffset + tensor->dataBegin; at < header->dataOffset + tensor->dataEnd; at += 2) {
      uint16_t value;
      std::memcpy(&value, data.data() + at, 2);
      if ((value & 0x7f80) != 0 && (value & 0x7f80) < 0x7a00)
        value = static_cast<uint16_t>(value + (shift << 7));
      std::memcpy(data.data() + at, &value, 2);
    }
  }
  std::ofstream(dir + "/model.safetensors", std::ios::binary)
      .write(data.data(), static_cast<std::streamsize>(data.size()));
}

ExpertSearchOptions smallSearch() {
  ExpertSearchOptions options;
  options.ratio = 0.125; // one expert of eight per layer
  options.sequenceLength = 64;
  options.maxTokens = 64;
  options.evaluations = 60;
  options.initial = 20;
  return options;
}

} // namespace

TEST(ExpertSearch, DropsTheHarmfulExpertsThatRoutingCannotSee) {
  TempDir dir;
  writeHarmedFixture(dir.path(), {{1, 5}, {3, 2}});
  auto model = loadModel(dir.path());
  ASSERT_TRUE(model.ok()) << model.status().message();
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  const ExpertSearchOptions options = smallSearch();
  auto result = searchExpertPruning(*model->engine, *streams, options);
  ASSERT_TRUE(result.ok()) << result.status().message();
  const std::vector<int64_t> &layer1 = result->best.kept.at(1), &layer3 = result->best.kept.at(3);
  EXPECT_EQ(layer1.size(), 7u);
  EXPECT_EQ(std::count(layer1.begin(), layer1.end(), 5), 0) << "the harmed expert of layer 1 is dropped";
  EXPECT_EQ(std::count(layer3.begin(), layer3.end(), 2), 0) << "the harmed expert of layer 3 is dropped";
  EXPECT_LT(result->best.loss, result->frequencyLoss) << "routing frequency cannot see the harm";
  EXPECT_LT(result->best.loss, result->originalLoss) << "dropping the harmed experts helps";
  EXPECT_EQ(static_cast<int64_t>(result->archive.size()), options.evaluations);
  for (size_t i = 1; i < result->archive.size(); ++i)
    EXPECT_LE(result->archive[i - 1].loss, result->archive[i].loss) << "the archive is sorted";

  // The reported loss is the engine's loss of the masked model, and the
  // masks were cleared after the search.
  auto plain = evaluate(*model->engine, *streams, {64, 0, 64});
  ASSERT_TRUE(plain.ok());
  EXPECT_NEAR(plain->overall.negativeLogLikelihood / static_cast<double>(plain->overall.targets), result->originalLoss,
              1e-12);
  std::map<int64_t, std::set<int64_t>> masks;
  for (const auto &[layer, kept] : result->best.kept)
    for (int64_t e = 0; e < 8; ++e)
      if (std::find(kept.begin(), kept.end(), e) == kept.end())
        masks[layer].insert(e);
  ASSERT_TRUE(model->engine->setMaskedExperts(masks).ok());
  auto masked = evaluate(*model->engine, *streams, {64, 0, 64});
  ASSERT_TRUE(masked.ok());
  EXPECT_NEAR(masked->overall.negativeLogLikelihood / static_cast<double>(masked->overall.targets), result->best.loss,
              1e-12);
  ASSERT_TRUE(model->engine->setMaskedExperts({}).ok());

  // The same seed gives the same search.
  auto again = searchExpertPruning(*model->engine, *streams, options);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->best.kept, result->best.kept);
  EXPECT_EQ(again->best.loss, result->best.loss);

  // The recipe drops exactly the experts not kept.
  nlohmann::json recipe = expertSearchRecipe(model->spec, *result, options);
  const std::string experts = recipe["passes"][0]["options"]["experts"];
  EXPECT_NE(experts.find("1:5"), std::string::npos) << experts;
  EXPECT_NE(experts.find("3:2"), std::string::npos) << experts;
  EXPECT_EQ(recipe["passes"][0]["pass"], "moe-drop-experts");
}

TEST(ExpertSearch, BadOptionsAreRefused) {
  auto mixtral = loadModel(dataDir() + "/fixtures/tiny-mixtral");
  auto deepseek = loadModel(dataDir() + "/fixtures/tiny-deepseek");
  ASSERT_TRUE(mixtral.ok() && deepseek.ok());
  auto message = [](const ModelSpec &spec, ExpertSearchOptions options) {
    return checkExpertSearchOptions(spec, options).message();
  };
  ExpertSearchOptions options;
  options.ratio = 0;
  EXPECT_NE(message(mixtral->spec, options).find("must lie in (0, 1)"), std::string::npos);
  options.ratio = 0.9;
  EXPECT_NE(message(mixtral->spec, options).find("fewer than top-k"), std::string::npos);
  options.ratio = 0.01;
  EXPECT_NE(message(mixtral->spec, options).find("removes no expert"), std::string::npos);
  options.ratio = 0.25;
  options.layers = {0};
  EXPECT_NE(message(deepseek->spec, options).find("layer 0 is not an MoE layer"), std::string::npos);
  options.layers = {9};
  EXPECT_NE(message(mixtral->spec, options).find("layer 9 is not an MoE layer"), std::string::npos);
  options.layers = {1, 2};
  EXPECT_TRUE(checkExpertSearchOptions(deepseek->spec, options).ok());
}

TEST(ExpertSearch, TheMergeStageShrinksExpertsEveryOneOfWhichIsTooLoud) {
  TempDir dir;
  std::vector<std::pair<int, int>> harmed;
  for (int e = 0; e < 8; ++e)
    harmed.emplace_back(1, e);
  writeHarmedFixture(dir.path(), harmed, 3);
  auto model = loadModel(dir.path());
  ASSERT_TRUE(model.ok()) << model.status().message();
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  ExpertSearchOptions options = smallSearch();
  options.ratio = 0.25;
  options.layers = {1};
  options.evaluations = 20;
  options.initial = 10;
  options.mergeEvaluations = 60;
  auto result = searchExpertPruning(*model->engine, *streams, options);
  ASSERT_TRUE(result.ok()) << result.status().message();
  EXPECT_EQ(result->archive.size(), 20u);
  EXPECT_EQ(result->mergeArchive.size(), 61u) << "the start and 60 children";
  EXPECT_EQ(result->pruningLoss, result->archive.front().loss);
  EXPECT_LT(result->best.loss, result->pruningLoss - 0.1) << "merging mends what pruning cannot";
  EXPECT_EQ(result->best.kept, result->archive.front().kept) << "the merge stage keeps the best keep-set";
  // Every kept expert of the loud layer keeps less than all of itself.
  const std::vector<int64_t> &kept = result->best.kept.at(1);
  const std::vector<std::vector<float>> &rows = result->best.mix.at(1);
  ASSERT_EQ(rows.size(), kept.size());
  double mean = 0;
  for (size_t j = 0; j < kept.size(); ++j) {
    ASSERT_EQ(rows[j].size(), 8u);
    EXPECT_LT(rows[j][static_cast<size_t>(kept[j])], 1.0f) << "expert " << kept[j];
    mean += rows[j][static_cast<size_t>(kept[j])] / static_cast<double>(kept.size());
  }
  EXPECT_LT(mean, 0.9);

  // The recipe mixes, then drops; its mix parses back to the best's rows.
  nlohmann::json recipe = expertSearchRecipe(model->spec, *result, options);
  ASSERT_EQ(recipe["passes"].size(), 2u);
  EXPECT_EQ(recipe["passes"][0]["pass"], "moe-mix-experts");
  EXPECT_EQ(recipe["passes"][1]["pass"], "moe-drop-experts");
  auto mixes = parseExpertMixes(recipe["passes"][0]["options"]["mix"].get<std::string>());
  ASSERT_TRUE(mixes.ok()) << mixes.status().message();
  ASSERT_EQ(mixes->count(1), 1u);
  for (size_t j = 0; j < kept.size(); ++j) {
    std::vector<float> row(8, 0.0f);
    for (const ExpertMixTerm &term : mixes->at(1).at(kept[j]))
      row[static_cast<size_t>(term.source)] = term.coefficient;
    EXPECT_EQ(row, rows[j]) << "expert " << kept[j];
  }
  EXPECT_NE(recipe["description"].get<std::string>().find("merge stage"), std::string::npos);

  // The engine was left as it was, and the same seed gives the same search.
  auto plain = evaluate(*model->engine, *streams, {64, 0, 64});
  ASSERT_TRUE(plain.ok());
  EXPECT_NEAR(plain->overall.negativeLogLikelihood / static_cast<double>(plain->overall.targets), result->originalLoss,
              1e-12);
  auto again = searchExpertPruning(*model->engine, *streams, options);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->best.mix, result->best.mix);
  EXPECT_EQ(again->best.loss, result->best.loss);
}

TEST(ExpertSearch, TheMergeStageAndReplacedExpertsRefuseWhatTheyCannotRun) {
  auto model = loadModel(dataDir() + "/fixtures/tiny-mixtral");
  ASSERT_TRUE(model.ok());
  Engine &engine = *model->engine;
  auto layer = engine.layerWeights(1);
  ASSERT_TRUE(layer.ok());
  auto copy = std::make_shared<MlpWeights>((*layer)->experts[3]);
  EXPECT_TRUE(engine.setReplacedExperts({{1, {{0, copy}}}}).ok());
  EXPECT_TRUE(engine.setReplacedExperts({}).ok());
  EXPECT_NE(engine.setReplacedExperts({{0, {{8, copy}}}}).message().find("layer 0 has no expert 8"), std::string::npos);
  EXPECT_NE(engine.setReplacedExperts({{7, {{0, copy}}}}).message().find("layer 7 is not an MoE layer"),
            std::string::npos);
  auto narrow = std::make_shared<MlpWeights>(*copy);
  narrow->up.rows -= 1;
  EXPECT_NE(engine.setReplacedExperts({{1, {{0, narrow}}}}).message().find("is not one gate"), std::string::npos);
  EXPECT_NE(engine.setReplacedExperts({{1, {{0, nullptr}}}}).message().find("is not one gate"), std::string::npos);
  // A replaced expert is what runs: expert 0 replaced by expert 3's weights
  // changes the loss, and by its own weights does not.
  auto streams = readEvalData(dataDir() + "/brown/calibration.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  auto lossNow = [&] {
    auto result = evaluate(engine, *streams, {64, 0, 64});
    EXPECT_TRUE(result.ok());
    return result->overall.negativeLogLikelihood;
  };
  const double original = lossNow();
  ASSERT_TRUE(engine.setReplacedExperts({{1, {{0, std::make_shared<MlpWeights>((*layer)->experts[0])}}}}).ok());
  EXPECT_EQ(lossNow(), original);
  ASSERT_TRUE(engine.setReplacedExperts({{1, {{0, copy}}}}).ok());
  EXPECT_NE(lossNow(), original);
  ASSERT_TRUE(engine.setReplacedExperts({}).ok());

  // The merge stage mixes float experts, on the host.
  ExpertSearchOptions options = smallSearch();
  options.mergeEvaluations = 1;
  EngineOptions cached;
  cached.expertCacheBytes = 1 << 20;
  auto withCache = loadModel(dataDir() + "/fixtures/tiny-mixtral", cached);
  ASSERT_TRUE(withCache.ok());
  auto refused = searchExpertPruning(*withCache->engine, *streams, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("no expert cache"), std::string::npos) << refused.status().message();
  options.mergeEvaluations = -1;
  EXPECT_NE(checkExpertSearchOptions(model->spec, options).message().find("--merge-evaluations must not be negative"),
            std::string::npos);
}

TEST(ExpertMix, TheTextFormRoundTripsAndBadTextIsNamed) {
  ExpertMixes mixes;
  mixes[1][0] = {{0, 0.94f}, {5, 0.0600000024f}};
  mixes[1][2] = {{2, 1.0f / 3.0f}, {3, -1e-7f}};
  mixes[3][4] = {{7, 1.5f}};
  const std::string text = formatExpertMixes(mixes);
  auto parsed = parseExpertMixes(text);
  ASSERT_TRUE(parsed.ok()) << parsed.status().message();
  EXPECT_EQ(*parsed, mixes) << text;
  auto error = [](const char *text) {
    auto parsed = parseExpertMixes(text);
    return parsed.ok() ? std::string("(parsed)") : parsed.status().message();
  };
  EXPECT_NE(error("1:0=0.5*0|0.5").find("expected 'coefficient*source'"), std::string::npos);
  EXPECT_NE(error("1:0=nan*0").find("a finite number"), std::string::npos);
  EXPECT_NE(error("1:0=1e99*0").find("a finite number"), std::string::npos);
  EXPECT_NE(error("x:0=1*0").find("expected 'layer:"), std::string::npos);
  EXPECT_NE(error("1:0=1*0,0=1*1").find("expert 0 of layer 1 is mixed twice"), std::string::npos);
  EXPECT_NE(error("1:0=1*2|1*2").find("names source 2 twice"), std::string::npos);
  EXPECT_NE(error("1:0=1*0;1:2=1*2").find("layer 1 is given twice"), std::string::npos);
  EXPECT_NE(error("1:=1*0").find("expected 'target="), std::string::npos);
  EXPECT_NE(error("1:0=1*-2").find("expected 'coefficient*source'"), std::string::npos);
  EXPECT_TRUE(parseExpertMixes("").ok());
}
