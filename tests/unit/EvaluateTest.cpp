//===- EvaluateTest.cpp - Windowing, perplexity and data formats ----------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Model.h"
#include "moe/Runtime/Sampling.h"

#include "TestSupport.h"

#include <limits>
#include <set>

#include <cmath>
#include <cstring>

using namespace moe;
using namespace moe::testing;

namespace {

std::vector<float> readF32(const SafetensorsFile &file, const std::string &name) {
  const TensorInfo *info = file.find(name);
  std::vector<float> values(static_cast<size_t>(info->numElements()));
  EXPECT_TRUE(convertToF32(info->dtype, file.data(*info).data(), values.size(), values.data()).ok());
  return values;
}

std::vector<int32_t> readIds(const SafetensorsFile &file, const std::string &name) {
  const TensorInfo *info = file.find(name);
  std::vector<int32_t> ids;
  for (int64_t i = 0; i < info->numElements(); ++i) {
    int64_t id;
    std::memcpy(&id, file.data(*info).data() + 8 * i, 8);
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

/// Mean NLL of ids[1..count] under golden logits rows 0..count-1.
double goldenMeanNll(const std::vector<float> &logits, const std::vector<int32_t> &ids, int64_t vocab, int64_t count) {
  double total = 0;
  for (int64_t t = 0; t < count; ++t) {
    const float *row = logits.data() + t * vocab;
    double maximum = *std::max_element(row, row + vocab), sum = 0;
    for (int64_t v = 0; v < vocab; ++v)
      sum += std::exp(row[v] - maximum);
    total -= row[ids[t + 1]] - maximum - std::log(sum);
  }
  return total / count;
}

} // namespace

TEST(Evaluate, PerplexityMatchesTheTransformersLogits) {
  auto model = loadModel(dataDir() + "/hf/qwen3_moe");
  ASSERT_TRUE(model.ok()) << model.status().message();
  auto golden = SafetensorsFile::open(dataDir() + "/hf-goldens/qwen3_moe.safetensors");
  ASSERT_TRUE(golden.ok());
  std::vector<int32_t> ids = readIds(**golden, "input_ids");
  std::vector<float> logits = readF32(**golden, "logits");
  const int64_t V = model->spec.vocabSize;

  // 17 ids, --seq-len 16: one window of 16 targets.
  auto result = evaluate(*model->engine, {{"all", ids, 0}}, {16, 0, 0});
  ASSERT_TRUE(result.ok()) << result.status().message();
  EXPECT_EQ(result->overall.targets, 16);
  double expected = std::exp(goldenMeanNll(logits, ids, V, 16));
  EXPECT_NEAR(result->overall.perplexity(), expected, 1e-3 * expected);
  EXPECT_DOUBLE_EQ(result->expertsPerToken, 2.0);

  // --seq-len 5: floor(16 / 5) = 3 windows, each from an empty cache, so
  // later windows differ from the single-window logits.
  result = evaluate(*model->engine, {{"all", ids, 0}}, {5, 0, 0});
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result->overall.targets, 15);
  // Stride 4 with length 8: every target scored exactly once.
  result = evaluate(*model->engine, {{"all", ids, 0}}, {8, 4, 0});
  ASSERT_TRUE(result.ok());
  EXPECT_EQ(result->overall.targets, 16);
  // The first window's targets equal the prefix of the golden.
  auto first = evaluate(*model->engine, {{"all", std::vector<int32_t>(ids.begin(), ids.begin() + 9), 0}}, {8, 0, 0});
  ASSERT_TRUE(first.ok());
  EXPECT_NEAR(std::log(first->overall.perplexity()), goldenMeanNll(logits, ids, V, 8), 1e-4);
}

TEST(Evaluate, RejectsImpossibleOptionsAndData) {
  auto model = loadModel(dataDir() + "/hf/mixtral");
  ASSERT_TRUE(model.ok());
  std::vector<int32_t> ids(10, 1);
  expectErrorContains(evaluate(*model->engine, {{"all", ids, 0}}, {4, 8, 0}).status(),
                      {"--stride (8) must not exceed --seq-len (4)"});
  expectErrorContains(evaluate(*model->engine, {{"all", ids, 0}}, {64, 0, 0}).status(),
                      {"no complete window of 64 tokens", "10 tokens"});
  ids[3] = 500;
  expectErrorContains(evaluate(*model->engine, {{"web", ids, 0}}, {4, 0, 0}).status(),
                      {"domain 'web'", "token id 500", "vocabulary of 128"});
}

TEST(Evaluate, ReadsEveryDataFormatAndNamesBadInput) {
  TempDir dir;
  std::string u32 = dir.file("ids.u32");
  uint32_t raw[3] = {5, 6, 7};
  writeFile(u32, std::string(reinterpret_cast<const char *>(raw), sizeof(raw)));
  auto streams = readEvalData(u32, nullptr, std::nullopt);
  ASSERT_TRUE(streams.ok()) << streams.status().message();
  EXPECT_EQ((*streams)[0].ids, (std::vector<int32_t>{5, 6, 7}));

  writeFile(dir.file("odd.u32"), "abcde");
  expectErrorContains(readEvalData(dir.file("odd.u32"), nullptr, std::nullopt).status(),
                      {"odd.u32", "not a multiple of 4"});

  std::string jsonl = dir.file("data.jsonl");
  writeFile(jsonl, "{\"ids\": [1, 2], \"domain\": \"a\"}\n\n{\"ids\": [3], \"domain\": \"b\"}\n"
                   "{\"ids\": [4], \"domain\": \"a\"}\n");
  streams = readEvalData(jsonl, nullptr, 0);
  ASSERT_TRUE(streams.ok()) << streams.status().message();
  ASSERT_EQ(streams->size(), 2u);
  EXPECT_EQ((*streams)[0].domain, "a");
  EXPECT_EQ((*streams)[0].ids, (std::vector<int32_t>{1, 2, 0, 4, 0})) << "end-of-text after each document";

  writeFile(jsonl, "{\"ids\": [1]}\nnot json\n");
  expectErrorContains(readEvalData(jsonl, nullptr, std::nullopt).status(), {"data.jsonl:2", "not valid JSON"});
  writeFile(jsonl, "{\"ids\": [1]}\n{\"text\": \"caf\xe9\"}\n");
  expectErrorContains(readEvalData(jsonl, nullptr, std::nullopt).status(), {"data.jsonl:2", "UTF-8"});
  writeFile(jsonl, "[1, 2]\n");
  expectErrorContains(readEvalData(jsonl, nullptr, std::nullopt).status(), {"data.jsonl:1", "not a JSON object"});
  expectErrorContains(readEvalData(dir.path(), nullptr, std::nullopt).status(), {"is a directory", "expected a file"});
  writeFile(jsonl, "{\"ids\": [-1]}\n");
  expectErrorContains(readEvalData(jsonl, nullptr, std::nullopt).status(), {"data.jsonl:1", "non-negative"});
  writeFile(jsonl, "{\"text\": \"hello\"}\n");
  expectErrorContains(readEvalData(jsonl, nullptr, std::nullopt).status(), {"data.jsonl", "tokenizer.json"});
  writeFile(jsonl, "{\"words\": 3}\n");
  expectErrorContains(readEvalData(jsonl, nullptr, std::nullopt).status(),
                      {"data.jsonl:1", "\"text\" string or an \"ids\" list"});
  expectErrorContains(readEvalData(dir.file("missing.txt"), nullptr, std::nullopt).status(),
                      {"missing.txt", "cannot read"});
}

TEST(Sampling, GreedyTopKAndSeededDraws) {
  const std::vector<float> logits = {0.1f, 2.0f, -1.0f, 1.9f, 0.0f};
  std::mt19937_64 rng(7);
  const auto sample = [&](const SamplingOptions &options, std::mt19937_64 &r) {
    Expected<int32_t> token = sampleToken(logits.data(), 5, options, r);
    EXPECT_TRUE(token) << token.status().message();
    return token ? *token : -1;
  };
  EXPECT_EQ(sample(SamplingOptions{0.0, 0}, rng), 1);
  EXPECT_EQ(sample(SamplingOptions{1.0, 1}, rng), 1) << "top-1 is greedy";
  // Top-2 at a high temperature draws only the two best, both of them.
  std::set<int32_t> seen;
  for (int i = 0; i < 200; ++i)
    seen.insert(sample(SamplingOptions{5.0, 2}, rng));
  EXPECT_EQ(seen, (std::set<int32_t>{1, 3}));
  std::mt19937_64 a(3), b(3);
  for (int i = 0; i < 20; ++i)
    EXPECT_EQ(sample(SamplingOptions{1.0, 0}, a), sample(SamplingOptions{1.0, 0}, b));
}

TEST(Sampling, NonFiniteLogitsAreAnErrorNotAToken) {
  // A broken model's NaN or infinite logits: greedy would take whichever
  // max_element meets first, sampling would sort with no order.
  std::mt19937_64 rng(7);
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()})
    for (double temperature : {0.0, 1.0}) {
      const std::vector<float> logits = {0.1f, 2.0f, bad, 1.9f};
      Expected<int32_t> token = sampleToken(logits.data(), 4, SamplingOptions{temperature, 0}, rng);
      ASSERT_FALSE(token) << "logit " << bad << " at temperature " << temperature << " gave token " << *token;
      expectErrorContains(token.status(), {"logit 2", "non-finite"});
    }
}
