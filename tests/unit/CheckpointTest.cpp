//===- CheckpointTest.cpp - Directories, shards and FP8 dequantisation ----===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Checkpoint.h"
#include "moe/Frontend/SyntheticCheckpoint.h"

#include "TestSupport.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <random>

using namespace moe;
using namespace moe::testing;

namespace {

void writeIndex(const std::string &dir, const std::string &weightMap) {
  writeFile(dir + "/model.safetensors.index.json", R"({"metadata":{"total_size":0},"weight_map":)" + weightMap + "}");
}

void writeShard(const std::string &path, const std::vector<std::string> &names) {
  SafetensorsWriter writer;
  for (const std::string &name : names)
    ASSERT_TRUE(writer.addTensor(name, DType::F32, {2}, std::vector<uint8_t>(8)).ok());
  ASSERT_TRUE(writer.write(path).ok());
}

} // namespace

TEST(Checkpoint, ResolvesTensorsAcrossShardsThroughTheIndex) {
  TempDir dir;
  writeShard(dir.file("model-00001-of-00002.safetensors"), {"a", "b"});
  writeShard(dir.file("model-00002-of-00002.safetensors"), {"c"});
  writeIndex(dir.path(), R"({"a":"model-00001-of-00002.safetensors",)"
                         R"("b":"model-00001-of-00002.safetensors",)"
                         R"("c":"model-00002-of-00002.safetensors"})");
  auto checkpoint = Checkpoint::open(dir.path());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status().message();
  EXPECT_TRUE((*checkpoint)->isSharded());
  EXPECT_EQ((*checkpoint)->shards().size(), 2u);
  EXPECT_EQ((*checkpoint)->tensorNames(), (std::vector<std::string>{"a", "b", "c"}));
  ASSERT_NE((*checkpoint)->find("c"), nullptr);
  EXPECT_NE((*checkpoint)->find("c")->file->path().find("00002-of"), std::string::npos);
  EXPECT_EQ((*checkpoint)->find("d"), nullptr);
}

TEST(Checkpoint, IndexPointingAtAMissingShardIsNamed) {
  TempDir dir;
  writeShard(dir.file("model-00001-of-00002.safetensors"), {"a"});
  writeIndex(dir.path(), R"({"a":"model-00001-of-00002.safetensors",)"
                         R"("layers.3.w":"model-00002-of-00002.safetensors"})");
  expectErrorContains(Checkpoint::open(dir.path()).status(), {"model.safetensors.index.json", "'layers.3.w'",
                                                              "'model-00002-of-00002.safetensors'", "does not exist"});
}

TEST(Checkpoint, IndexNamingATensorItsShardLacksIsNamed) {
  TempDir dir;
  writeShard(dir.file("s1.safetensors"), {"a"});
  writeIndex(dir.path(), R"({"a":"s1.safetensors","ghost":"s1.safetensors"})");
  expectErrorContains(Checkpoint::open(dir.path()).status(), {"'ghost'", "'s1.safetensors'", "does not contain it"});
}

TEST(Checkpoint, MalformedIndexIsNamed) {
  TempDir dir;
  writeFile(dir.file("model.safetensors.index.json"), "{\"weight_map\": 3}");
  expectErrorContains(Checkpoint::open(dir.path()).status(), {"model.safetensors.index.json", "'weight_map'"});
  writeFile(dir.file("model.safetensors.index.json"), "not json");
  expectErrorContains(Checkpoint::open(dir.path()).status(), {"model.safetensors.index.json", "not a JSON object"});
  writeIndex(dir.path(), R"({"a":"../escape.safetensors"})");
  expectErrorContains(Checkpoint::open(dir.path()).status(), {"'../escape.safetensors'", "inside the directory"});
}

TEST(Checkpoint, UnreadableOrEmptyDirectoriesAreNamed) {
  TempDir dir;
  std::string missing = dir.file("no-such-model");
  expectErrorContains(Checkpoint::open(missing).status(), {missing, "not a readable directory"});
  expectErrorContains(Checkpoint::open(dir.path()).status(),
                      {dir.path(), "no model.safetensors or model.safetensors.index.json"});
  // A shard that is corrupt is named by its own path.
  writeFile(dir.file("model.safetensors"), "garbage!garbage!");
  expectErrorContains(Checkpoint::open(dir.path()).status(), {dir.file("model.safetensors"), "header"});
}

TEST(Checkpoint, DequantisesFp8WeightsWithBlockScalesFromAnotherShard) {
  // A 130 x 260 weight spans 2 x 3 blocks of 128, the last ones partial.
  const int64_t rows = 130, cols = 260;
  std::mt19937 rng(7);
  std::vector<uint8_t> codes(rows * cols);
  for (uint8_t &code : codes) {
    code = static_cast<uint8_t>(rng() % 256);
    if ((code & 0x7F) == 0x7F)
      code = 0x30; // keep NaN encodings out of the reference comparison
  }
  std::vector<float> scales = {0.5f, 2.0f, 0.125f, 4.0f, 1.0f, 3.0f};

  TempDir dir;
  SafetensorsWriter weights, scaleShard;
  ASSERT_TRUE(weights.addTensor("w", DType::F8E4M3, {rows, cols}, codes).ok());
  std::vector<uint8_t> scaleBytes(scales.size() * 4);
  std::memcpy(scaleBytes.data(), scales.data(), scaleBytes.size());
  ASSERT_TRUE(scaleShard.addTensor("w_scale_inv", DType::F32, {2, 3}, scaleBytes).ok());
  ASSERT_TRUE(weights.write(dir.file("a.safetensors")).ok());
  ASSERT_TRUE(scaleShard.write(dir.file("b.safetensors")).ok());
  writeIndex(dir.path(), R"({"w":"a.safetensors","w_scale_inv":"b.safetensors"})");

  auto checkpoint = Checkpoint::open(dir.path());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status().message();
  std::vector<float> values;
  ASSERT_TRUE((*checkpoint)->loadF32("w", values).ok());
  ASSERT_EQ(values.size(), codes.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      ASSERT_EQ(values[r * cols + c], float8E4M3ToFloat(codes[r * cols + c]) * scales[(r / 128) * 3 + c / 128])
          << r << "," << c;

  // Streaming in chunks of 7 rows (crossing the 128-row block boundary
  // mid-chunk) gives the same values through one small buffer.
  std::vector<float> streamed;
  int64_t expectedFirst = 0;
  Status status = (*checkpoint)->streamF32("w", 7, [&](int64_t first, int64_t count, const float *rowsData) {
    EXPECT_EQ(first, expectedFirst);
    EXPECT_LE(count, 7);
    expectedFirst += count;
    streamed.insert(streamed.end(), rowsData, rowsData + count * cols);
    return Status::success();
  });
  ASSERT_TRUE(status.ok()) << status.message();
  EXPECT_EQ(streamed, values);
}

TEST(Checkpoint, StreamStopsAtTheConsumersError) {
  TempDir dir;
  writeShard(dir.file("model.safetensors"), {"bias"});
  auto checkpoint = Checkpoint::open(dir.path());
  ASSERT_TRUE(checkpoint.ok());
  int calls = 0;
  Status status = (*checkpoint)->streamF32("bias", 4, [&](int64_t, int64_t count, const float *) {
    ++calls;
    EXPECT_EQ(count, 1) << "a 1-D tensor is one row";
    return Status::error("consumer gave up");
  });
  expectErrorContains(status, {"consumer gave up"});
  EXPECT_EQ(calls, 1);
  expectErrorContains((*checkpoint)->streamF32("nope", 1, nullptr), {"'nope' not found"});
}

TEST(Checkpoint, Fp8ScaleWithTheWrongShapeIsNamed) {
  TempDir dir;
  SafetensorsWriter writer;
  ASSERT_TRUE(writer.addTensor("w", DType::F8E4M3, {130, 4}, std::vector<uint8_t>(520)).ok());
  ASSERT_TRUE(writer.addTensor("w_scale_inv", DType::F32, {1, 1}, std::vector<uint8_t>(4)).ok());
  ASSERT_TRUE(writer.write(dir.file("model.safetensors")).ok());
  auto checkpoint = Checkpoint::open(dir.path());
  ASSERT_TRUE(checkpoint.ok());
  std::vector<float> values;
  expectErrorContains((*checkpoint)->loadF32("w", values), {"'w_scale_inv'", "[1, 1]", "expected [2, 1]"});
  expectErrorContains((*checkpoint)->loadF32("nope", values), {"'nope' not found"});
}

TEST(Checkpoint, LoadsSyntheticFp8CheckpointCloseToTheF32Weights) {
  // Quantise-dequantise error of E4M3 is at most half a mantissa step of
  // 1/8 relative, i.e. <= 6.25% of each value (plus the subnormal floor).
  TempDir dir;
  SyntheticOptions options;
  options.family = ModelFamily::DeepseekV3;
  options.fp8 = true;
  options.shards = 3;
  ASSERT_TRUE(writeSyntheticCheckpoint(dir.path(), options).ok());
  auto checkpoint = Checkpoint::open(dir.path());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status().message();
  const std::string name = "model.layers.1.mlp.experts.3.down_proj.weight";
  ASSERT_EQ((*checkpoint)->find(name)->info->dtype, DType::F8E4M3);
  ASSERT_NE((*checkpoint)->find(name)->file, (*checkpoint)->find(name + "_scale_inv")->file)
      << "the scale sits in another shard";
  std::vector<float> values;
  ASSERT_TRUE((*checkpoint)->loadF32(name, values).ok());
  double sumSquares = 0;
  for (float value : values)
    sumSquares += value * value;
  double rms = std::sqrt(sumSquares / values.size());
  EXPECT_NEAR(rms, 0.05, 0.005) << "synthetic weights are N(0, 0.05)";
}

// A model with fewer layers than shards (one DeepSeek-V3 layer is 15 GB)
// is sharded by bytes: every shard written, none holding most of the
// checkpoint (by layer, the one layer's shard would hold it all, in
// memory until written), and the checkpoint reads back whole.
TEST(Checkpoint, SyntheticShardsOfAOneLayerModelSplitItsBytes) {
  TempDir dir;
  SyntheticOptions options;
  options.family = ModelFamily::DeepseekV3;
  options.fp8 = true;
  options.shards = 4;
  nlohmann::json config = nlohmann::json::parse(syntheticConfigJson(ModelFamily::DeepseekV3, true));
  config["num_hidden_layers"] = 1;
  config["first_k_dense_replace"] = 0;
  options.configText = config.dump();
  ASSERT_TRUE(writeSyntheticCheckpoint(dir.path(), options).ok());
  uint64_t total = 0, largest = 0;
  for (int shard = 1; shard <= 4; ++shard) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05d-of-00004.safetensors", shard);
    ASSERT_TRUE(std::filesystem::exists(dir.file(name))) << name;
    const uint64_t size = std::filesystem::file_size(dir.file(name));
    total += size;
    largest = std::max(largest, size);
  }
  EXPECT_LT(largest, total / 2) << "one shard holds most of the checkpoint";
  auto checkpoint = Checkpoint::open(dir.path());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status().message();
  std::vector<float> values;
  for (const char *name :
       {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.experts.0.up_proj.weight"})
    EXPECT_TRUE((*checkpoint)->loadF32(name, values).ok()) << name;
}

// FP8 E4M3 rounding (moec-synth's) is the nearest code, ties to the even
// one: the same as a search of every code, on every code's value, the
// midpoints between neighbours, and values spread over the range.
TEST(Checkpoint, Fp8RoundingIsTheNearestCodeTiesToEven) {
  auto bySearch = [](float value) {
    const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
    const float magnitude = std::min(std::fabs(value), 448.0f);
    uint8_t best = 0;
    float bestError = INFINITY;
    for (uint8_t code = 0; code < 0x7F; ++code) {
      const float error = std::fabs(float8E4M3ToFloat(code) - magnitude);
      if (error < bestError || (error == bestError && (code & 1) == 0)) {
        best = code;
        bestError = error;
      }
    }
    return static_cast<uint8_t>(sign | best);
  };
  std::vector<float> values = {0.0f, -0.0f, 448.0f, 500.0f, -1e9f, 1e-12f};
  for (int code = 0; code < 0x7F; ++code) {
    const float v = float8E4M3ToFloat(static_cast<uint8_t>(code));
    values.push_back(v);
    values.push_back(-v);
    if (code + 1 < 0x7F) {
      const float next = float8E4M3ToFloat(static_cast<uint8_t>(code + 1));
      values.push_back((v + next) / 2);
      values.push_back(std::nextafter((v + next) / 2, 0.0f));
      values.push_back(std::nextafter((v + next) / 2, 1000.0f));
    }
  }
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> exponent(-12.0f, 9.5f);
  for (int i = 0; i < 20000; ++i)
    values.push_back((i % 2 ? -1.0f : 1.0f) * std::exp2(exponent(rng)));
  for (float v : values)
    ASSERT_EQ(floatToFloat8E4M3(v), bySearch(v)) << v;
}
