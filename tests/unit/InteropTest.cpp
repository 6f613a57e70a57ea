//===- InteropTest.cpp - Files written by Python safetensors/transformers -===//
//
// Part of moec. "Ours loads theirs": the all-dtypes file written by the
// Python safetensors library, and tiny checkpoints saved by transformers
// for every family, checked against goldens the Python side computed.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Checkpoint.h"
#include "moe/Frontend/ModelSpec.h"

#include "TestSupport.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>

using namespace moe;
using namespace moe::testing;
using json = nlohmann::json;

TEST(Interop, ReadsEveryDtypeWrittenByPythonSafetensors) {
  json golden = json::parse(readFile(dataDir() + "/safetensors/dtypes.json"));
  auto file = SafetensorsFile::open(dataDir() + "/safetensors/python_written.safetensors");
  ASSERT_TRUE(file.ok()) << file.status().message();
  EXPECT_EQ((*file)->metadata().at("writer"), "python-safetensors");
  int checked = 0;
  for (auto &[name, spec] : golden.items()) {
    if (name[0] == '_')
      continue;
    const TensorInfo *info = (*file)->find(name);
    ASSERT_NE(info, nullptr) << name;
    EXPECT_EQ(dtypeName(info->dtype), spec["dtype"].get<std::string>());
    EXPECT_EQ(info->shape, (std::vector<int64_t>{2, 3}));
    std::span<const uint8_t> bytes = (*file)->data(*info);
    const json &values = spec["values"];
    if (isFloatDType(info->dtype)) {
      std::vector<float> out(6);
      ASSERT_TRUE(convertToF32(info->dtype, bytes.data(), 6, out.data()).ok());
      for (size_t i = 0; i < 6; ++i)
        EXPECT_EQ(out[i], static_cast<float>(values[i].get<double>())) << name << "[" << i << "]";
    } else {
      for (size_t i = 0; i < 6; ++i) {
        int64_t value = 0;
        const uint8_t *element = bytes.data() + i * dtypeBytes(info->dtype);
        switch (info->dtype) {
        case DType::Bool:
        case DType::U8:
          value = *element;
          break;
        case DType::I8:
          value = static_cast<int8_t>(*element);
          break;
        case DType::I16: {
          int16_t v;
          std::memcpy(&v, element, 2);
          value = v;
          break;
        }
        case DType::I32: {
          int32_t v;
          std::memcpy(&v, element, 4);
          value = v;
          break;
        }
        case DType::I64:
          std::memcpy(&value, element, 8);
          break;
        default:
          FAIL() << name;
        }
        EXPECT_EQ(value, values[i].get<int64_t>()) << name << "[" << i << "]";
      }
    }
    ++checked;
  }
  EXPECT_EQ(checked, 12);
}

class TransformersCheckpoints : public ::testing::TestWithParam<std::string> {};

TEST_P(TransformersCheckpoints, BindAndMatchThePythonSums) {
  const std::string name = GetParam();
  const std::string dir = dataDir() + "/hf/" + name;
  auto spec = ModelSpec::fromConfigFile(dir + "/config.json");
  ASSERT_TRUE(spec.ok()) << spec.status().message();
  auto checkpoint = Checkpoint::open(dir);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status().message();
  auto report = bindCheckpoint(*spec, **checkpoint);
  ASSERT_TRUE(report.ok()) << report.status().message();
  EXPECT_TRUE(report->warnings.empty()) << report->warnings.front();
  EXPECT_EQ(spec->tensors().size(), (*checkpoint)->tensorCount())
      << "every tensor transformers saved is one ModelSpec expects";
  if (name == "mixtral_fused")
    EXPECT_EQ(spec->layers[0].expertLayout, ExpertLayout::Fused);

  json golden = json::parse(readFile(dataDir() + "/hf/golden.json"))[name];
  ASSERT_EQ(golden.size(), (*checkpoint)->tensorCount());
  std::vector<float> values;
  for (auto &[tensor, expected] : golden.items()) {
    ASSERT_TRUE((*checkpoint)->loadF32(tensor, values).ok()) << tensor;
    double sum = 0, sumSquares = 0;
    for (float value : values) {
      sum += value;
      sumSquares += static_cast<double>(value) * value;
    }
    double expectedSumSquares = expected["sum_squares"].get<double>();
    EXPECT_NEAR(sum, expected["sum"].get<double>(), 1e-9 * (1 + expectedSumSquares)) << tensor;
    EXPECT_NEAR(sumSquares, expectedSumSquares, 1e-9 * (1 + expectedSumSquares)) << tensor;
    EXPECT_EQ((*checkpoint)->find(tensor)->info->shape, expected["shape"].get<std::vector<int64_t>>()) << tensor;
  }
}

INSTANTIATE_TEST_SUITE_P(Families, TransformersCheckpoints,
                         ::testing::Values("mixtral", "mixtral_fused", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                                           "deepseek_v3", "phimoe", "phimoe_longrope", "deepseek_v2_grouped",
                                           "olmoe_clip"));
