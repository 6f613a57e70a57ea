//===- FixtureTest.cpp - The bundled fixture models, end to end -----------===//
//
// Part of moec. The fixtures are tiny MoE models trained on the Brown corpus
// (scripts/fixtures/train_fixture.py). Their training report holds the
// held-out perplexity that transformers computed with the project's
// windowing; moec's engine, tokenizer and evaluation must reproduce it.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Model.h"

#include "TestSupport.h"

#include <nlohmann/json.hpp>

using namespace moe;
using namespace moe::testing;

class Fixtures : public ::testing::TestWithParam<std::string> {};

TEST_P(Fixtures, HeldOutPerplexityMatchesTransformersWithinATenthOfAPercent) {
  const std::string dir = dataDir() + "/fixtures/" + GetParam();
  auto model = loadModel(dir);
  ASSERT_TRUE(model.ok()) << model.status().message();
  ASSERT_TRUE(model->tokenizer);
  ASSERT_TRUE(model->endOfText.has_value());
  auto report = nlohmann::json::parse(readFile(dir + "/training_report.json"));
  auto streams = readEvalData(dataDir() + "/brown/heldout.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok()) << streams.status().message();
  auto result = evaluate(*model->engine, *streams, {report["seq_len"].get<int64_t>(), 0, 0});
  ASSERT_TRUE(result.ok()) << result.status().message();
  double expected = report["perplexity"].get<double>();
  EXPECT_NEAR(result->overall.perplexity(), expected, 1e-3 * expected);
  EXPECT_EQ(result->overall.targets, report["tokens"].get<int64_t>());
  for (const auto &[domain, score] : result->domains) {
    double domainExpected = report["per_domain"][domain]["perplexity"].get<double>();
    EXPECT_NEAR(score.perplexity(), domainExpected, 2e-3 * domainExpected) << domain;
  }
  // A real model: far below a unigram model of the training split.
  EXPECT_LT(result->overall.perplexity(), 0.2 * report["unigram_perplexity"].get<double>());
}

INSTANTIATE_TEST_SUITE_P(Bundled, Fixtures, ::testing::Values("tiny-mixtral", "tiny-deepseek"),
                         [](const ::testing::TestParamInfo<std::string> &info) { return testNameFrom(info.param); });
