//===- DTypeTest.cpp - Element types and f32 conversion -------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/DType.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

using namespace moe;

TEST(DType, TraitsTableMatchesEnumOrderAndNames) {
  for (DType dtype : {DType::Bool, DType::U8, DType::I8, DType::I16, DType::U16, DType::I32, DType::U32, DType::I64,
                      DType::U64, DType::F16, DType::BF16, DType::F32, DType::F64, DType::F8E4M3, DType::F8E5M2}) {
    EXPECT_EQ(dtypeTraits(dtype).dtype, dtype);
    EXPECT_EQ(parseDType(dtypeName(dtype)), dtype);
  }
  EXPECT_EQ(dtypeBytes(DType::BF16), 2u);
  EXPECT_EQ(dtypeBytes(DType::F8E4M3), 1u);
  EXPECT_FALSE(parseDType("F4").has_value());
  EXPECT_FALSE(parseDType("bf16").has_value());
}

TEST(DType, HalfRoundTripsEveryNonNaNBitPattern) {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    float value = halfToFloat(static_cast<uint16_t>(bits));
    if (std::isnan(value)) {
      EXPECT_EQ(bits & 0x7C00, 0x7C00u);
      continue;
    }
    EXPECT_EQ(floatToHalf(value), bits) << "half bits " << bits;
  }
  EXPECT_EQ(halfToFloat(0x3C00), 1.0f);
  EXPECT_EQ(halfToFloat(0xC000), -2.0f);
  EXPECT_EQ(halfToFloat(0x0001), std::ldexp(1.0f, -24)); // smallest subnormal
  EXPECT_EQ(halfToFloat(0x7BFF), 65504.0f);
  EXPECT_TRUE(std::isinf(halfToFloat(0x7C00)));
  // Round to nearest even at the boundary between two halves.
  EXPECT_EQ(floatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3C00);
  EXPECT_EQ(floatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);
  EXPECT_EQ(floatToHalf(70000.0f), 0x7C00);
}

TEST(DType, Bfloat16IsTheTopHalfOfF32WithRoundToNearestEven) {
  EXPECT_EQ(bfloat16ToFloat(0x3F80), 1.0f);
  EXPECT_EQ(floatToBfloat16(1.0f), 0x3F80);
  uint32_t halfway = 0x3F808000; // exactly between 0x3F80 and 0x3F81
  float value;
  std::memcpy(&value, &halfway, 4);
  EXPECT_EQ(floatToBfloat16(value), 0x3F80);
  halfway = 0x3F818000;
  std::memcpy(&value, &halfway, 4);
  EXPECT_EQ(floatToBfloat16(value), 0x3F82);
}

TEST(DType, Float8E4M3MatchesTheFnEncoding) {
  EXPECT_EQ(float8E4M3ToFloat(0x38), 1.0f);
  EXPECT_EQ(float8E4M3ToFloat(0x7E), 448.0f); // largest finite
  EXPECT_EQ(float8E4M3ToFloat(0xFE), -448.0f);
  EXPECT_EQ(float8E4M3ToFloat(0x01), std::ldexp(1.0f, -9)); // subnormal
  EXPECT_EQ(float8E4M3ToFloat(0x08), std::ldexp(1.0f, -6)); // smallest normal
  EXPECT_TRUE(std::isnan(float8E4M3ToFloat(0x7F)));
  EXPECT_TRUE(std::isnan(float8E4M3ToFloat(0xFF)));
  EXPECT_EQ(float8E4M3ToFloat(0x78), 256.0f); // no infinity: a normal value
}

TEST(DType, Float8E5M2IsTheUpperByteOfAHalf) {
  EXPECT_EQ(float8E5M2ToFloat(0x3C), 1.0f);
  EXPECT_EQ(float8E5M2ToFloat(0x7B), 57344.0f);
  EXPECT_TRUE(std::isinf(float8E5M2ToFloat(0x7C)));
  EXPECT_TRUE(std::isnan(float8E5M2ToFloat(0x7E)));
  EXPECT_EQ(float8E5M2ToFloat(0x01), std::ldexp(1.0f, -16));
}

TEST(DType, ConvertHandlesUnalignedSourcesAndEveryFloatType) {
  // 1003 elements at an odd address exercise both the vector bodies and
  // their scalar tails.
  const size_t count = 1003;
  std::vector<uint8_t> buffer(count * 8 + 1);
  uint8_t *source = buffer.data() + 1;
  std::vector<float> out(count);

  for (size_t i = 0; i < count; ++i) {
    uint16_t bits = floatToHalf(static_cast<float>(i) * 0.25f - 100.0f);
    std::memcpy(source + 2 * i, &bits, 2);
  }
  ASSERT_TRUE(convertToF32(DType::F16, source, count, out.data()).ok());
  for (size_t i = 0; i < count; ++i)
    EXPECT_EQ(out[i], static_cast<float>(i) * 0.25f - 100.0f);

  for (size_t i = 0; i < count; ++i) {
    uint16_t bits = floatToBfloat16(static_cast<float>(i % 256) - 128.0f);
    std::memcpy(source + 2 * i, &bits, 2);
  }
  ASSERT_TRUE(convertToF32(DType::BF16, source, count, out.data()).ok());
  for (size_t i = 0; i < count; ++i)
    EXPECT_EQ(out[i], static_cast<float>(i % 256) - 128.0f);

  for (size_t i = 0; i < count; ++i)
    source[i] = static_cast<uint8_t>(i);
  ASSERT_TRUE(convertToF32(DType::F8E4M3, source, count, out.data()).ok());
  for (size_t i = 0; i < count; ++i) {
    float expected = float8E4M3ToFloat(static_cast<uint8_t>(i));
    if (std::isnan(expected))
      EXPECT_TRUE(std::isnan(out[i]));
    else
      EXPECT_EQ(out[i], expected);
  }

  for (size_t i = 0; i < count; ++i) {
    double value = static_cast<double>(i) / 8.0;
    std::memcpy(source + 8 * i, &value, 8);
  }
  ASSERT_TRUE(convertToF32(DType::F64, source, count, out.data()).ok());
  EXPECT_EQ(out[17], 17.0f / 8.0f);
}

TEST(DType, ConvertRejectsIntegerTypes) {
  int32_t values[2] = {1, 2};
  float out[2];
  Status status = convertToF32(DType::I32, values, 2, out);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("I32"), std::string::npos);
}

TEST(DType, TorchDtypeNames) {
  EXPECT_EQ(parseTorchDType("bfloat16"), DType::BF16);
  EXPECT_EQ(parseTorchDType("torch.float16"), DType::F16);
  EXPECT_EQ(parseTorchDType("float32"), DType::F32);
  EXPECT_FALSE(parseTorchDType("int8").has_value());
}
