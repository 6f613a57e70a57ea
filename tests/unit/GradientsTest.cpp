//===- GradientsTest.cpp - The engine's backward pass ---------------------===//
//
// Part of moec. Engine::lossGradients against PyTorch autograd through the
// transformers implementation of every family (goldens from
// scripts/fixtures/make_gradient_goldens.py: the tiny checkpoints of
// tests/data/hf and the two trained fixtures on real text), and against
// central finite differences of the engine's own loss along random
// directions, including what only moec has (masked experts).
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Engine.h"
#include "moe/Runtime/Model.h"

#include "GradientCheck.h"
#include "TestSupport.h"

#include <cmath>
#include <cstring>
#include <map>
#include <random>

using namespace moe;
using namespace moe::testing;

namespace {

LoadedModel load(const std::string &dir, EngineOptions options = {}) {
  auto model = loadModel(dir, options);
  EXPECT_TRUE(model.ok()) << model.status().message();
  return model.take();
}

std::string modelDir(const std::string &name) {
  return dataDir() + (name.rfind("tiny-", 0) == 0 ? "/fixtures/" : "/hf/") + name;
}

/// What the backward reported.
class Recorder : public GradientObserver {
public:
  std::map<int64_t, std::vector<float>> blockOutput;
  std::vector<float> input;
  int64_t expertCalls = 0, expertTokens = 0;
  void onBlockOutputGradient(int64_t layer, int64_t, std::span<const float> gradient) override {
    EXPECT_FALSE(blockOutput.count(layer)) << "layer " << layer << " reported twice";
    blockOutput[layer].assign(gradient.begin(), gradient.end());
  }
  void onExpertGradient(int64_t, int64_t, std::span<const int32_t> tokens, std::span<const float> intermediate,
                        std::span<const float> gradient) override {
    ++expertCalls;
    expertTokens += static_cast<int64_t>(tokens.size());
    EXPECT_EQ(intermediate.size(), gradient.size());
  }
  void onInputGradient(int64_t, std::span<const float> gradient) override {
    input.assign(gradient.begin(), gradient.end());
  }
};

std::vector<float> readF32(const SafetensorsFile &file, const std::string &name) {
  const TensorInfo *info = file.find(name);
  EXPECT_NE(info, nullptr) << name;
  if (!info)
    return {};
  std::vector<float> values(static_cast<size_t>(info->numElements()));
  EXPECT_TRUE(convertToF32(info->dtype, file.data(*info).data(), values.size(), values.data()).ok());
  return values;
}

/// The token ids of a model's gradient golden (scripts/fixtures/make_gradient_goldens.py).
std::vector<int32_t> goldenIds(const SafetensorsFile &file) {
  const TensorInfo *info = file.find("input_ids");
  EXPECT_NE(info, nullptr);
  std::vector<int32_t> ids;
  for (int64_t i = 0; info && i < info->numElements(); ++i) {
    int64_t id;
    std::memcpy(&id, file.data(*info).data() + 8 * i, 8);
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

std::unique_ptr<SafetensorsFile> openGolden(const std::string &name) {
  auto file = SafetensorsFile::open(dataDir() + "/gradient-goldens/" + name + ".safetensors");
  EXPECT_TRUE(file.ok()) << file.status().message();
  return file.ok() ? file.take() : nullptr;
}

/// max |a - b| / max |b|: the error relative to the tensor's scale.
double relativeError(const std::vector<float> &a, const std::vector<float> &b) {
  EXPECT_EQ(a.size(), b.size());
  double worst = 0, scale = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return scale > 0 ? worst / scale : worst;
}

} // namespace

class GradientParity : public ::testing::TestWithParam<std::string> {};

TEST_P(GradientParity, ActivationGradientsMatchPyTorchAutograd) {
  const std::string name = GetParam();
  LoadedModel model = load(modelDir(name));
  ASSERT_TRUE(model.engine);
  std::unique_ptr<SafetensorsFile> file = openGolden(name);
  ASSERT_TRUE(file);
  const std::vector<int32_t> ids = goldenIds(*file);
  Recorder recorder;
  Expected<double> loss = model.engine->lossGradients(ids, recorder);
  ASSERT_TRUE(loss.ok()) << loss.status().message();
  const double goldenLoss = readF32(*file, "loss")[0];
  EXPECT_NEAR(*loss, goldenLoss, 1e-5 * goldenLoss) << name;
  const double inputError = relativeError(recorder.input, readF32(*file, "input_gradient"));
  EXPECT_LE(inputError, 1e-3) << name << " input gradient";
  RecordProperty("input_gradient_relative_error", std::to_string(inputError));
  ASSERT_EQ(static_cast<int64_t>(recorder.blockOutput.size()), model.spec.numLayers);
  for (int64_t l = 0; l < model.spec.numLayers; ++l) {
    const double error = relativeError(recorder.blockOutput[l], readF32(*file, concat("block_output_gradient.", l)));
    EXPECT_LE(error, 1e-3) << name << " layer " << l << " block output gradient";
  }
  EXPECT_GT(recorder.expertCalls, 0);
}

INSTANTIATE_TEST_SUITE_P(Families, GradientParity,
                         ::testing::Values("mixtral", "mixtral_fused", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                                           "deepseek_v3", "phimoe", "phimoe_longrope", "deepseek_v2_grouped",
                                           "olmoe_clip", "tiny-mixtral", "tiny-deepseek"),
                         [](const auto &info) { return testNameFrom(info.param); });

TEST(Gradients, FiniteDifferencesAgreeForEveryRouterAndAttention) {
  for (const std::string name : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe_clip", "deepseek_v2_grouped",
                                 "deepseek_v3", "phimoe", "tiny-deepseek"}) {
    LoadedModel model = load(modelDir(name));
    std::vector<int32_t> ids;
    for (int32_t t = 0; t < 12; ++t)
      ids.push_back((t * 37 + 11) % 100);
    if (name == "deepseek_v3") {
      // These ids put a choice of the random tiny model within 1e-4 of a
      // tie (every step flips it); its golden's ids do not.
      std::unique_ptr<SafetensorsFile> file = openGolden(name);
      ASSERT_TRUE(file);
      ids = goldenIds(*file);
    }
    expectFiniteDifferencesAgree(*model.engine, ids, name);
  }
}

// Masked experts (NAEE's engine option) are absent from routing: the
// gradient is that of the model without them, and still exact.
TEST(Gradients, MaskedExpertsAreAbsentFromTheGradient) {
  EngineOptions options;
  options.maskedExperts[1] = {0, 3};
  for (const std::string name : {"mixtral", "deepseek_v3"}) {
    LoadedModel masked = load(modelDir(name), options), full = load(modelDir(name));
    std::vector<int32_t> ids;
    for (int32_t t = 0; t < 10; ++t)
      ids.push_back((t * 29 + 5) % 100);
    expectFiniteDifferencesAgree(*masked.engine, ids, name + " masked");
    Recorder a, b;
    ASSERT_TRUE(masked.engine->lossGradients(ids, a).ok());
    ASSERT_TRUE(full.engine->lossGradients(ids, b).ok());
    EXPECT_GT(relativeError(a.input, b.input), 1e-3) << "masking changes the gradient";
  }
}

TEST(Gradients, RejectsWindowsItCannotDifferentiate) {
  LoadedModel model = load(modelDir("mixtral"));
  GradientObserver none;
  std::vector<int32_t> one = {3};
  expectErrorContains(model.engine->lossGradients(one, none).status(), {"at least 2 tokens", "got 1"});
  std::vector<int32_t> outside = {3, 128};
  expectErrorContains(model.engine->lossGradients(outside, none).status(), {"token id 128", "[0, 128)"});
  std::vector<int32_t> ids = {3, 4, 5};
  std::vector<float> wrong(7);
  expectErrorContains(model.engine->lossGradients(ids, none, wrong).status(), {"embeddings hold 7 values"});
}
