//===- ExpertSearchTest.cpp - EEP's pruning search finds known answers ----===//
//
// Part of moec. A model with two experts made harmful (their down
// projections scaled 32x, which routing cannot see): the search must drop
// exactly those, the routing-frequency candidate does not, the same seed
// gives the same search, and the reported loss is the engine's loss of the
// masked model.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/ExpertSearch.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Runtime/Model.h"
#include "moe/Support/File.h"

#include "../unit/TestSupport.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>

using namespace moe;
using namespace moe::testing;

namespace {

/// tiny-mixtral copied into `dir` with the w2 of (layer, expert) pairs
/// multiplied by 32 (five added to each non-zero bf16 exponent).
void writeHarmedFixture(const std::string &dir, const std::vector<std::pair<int, int>> &harmed) {
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
        value = static_cast<uint16_t>(value + (5 << 7));
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
