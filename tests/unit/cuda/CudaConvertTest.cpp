//===- CudaConvertTest.cpp - The CUDA conversion kernel vs the reference --===//
//
// Part of moec. Skips cleanly on machines without a GPU.
//
//===----------------------------------------------------------------------===//

#include "cuda/Convert.h"
#include "moe/Frontend/DType.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>

using namespace moe;

TEST(CudaConvert, Bfloat16ToF32MatchesTheScalarReference) {
  if (cuda::deviceCount() == 0)
    GTEST_SKIP() << "no CUDA device";
  const size_t count = (1 << 20) + 17; // more than one grid pass, odd tail
  std::vector<uint16_t> source(count);
  std::mt19937 rng(3);
  for (uint16_t &bits : source)
    bits = static_cast<uint16_t>(rng());
  std::vector<float> out(count);
  Status status = cuda::convertBfloat16ToF32(source.data(), count, out.data());
  ASSERT_TRUE(status.ok()) << status.message();
  for (size_t i = 0; i < count; ++i) {
    float expected = bfloat16ToFloat(source[i]);
    ASSERT_EQ(std::memcmp(&out[i], &expected, 4), 0) << i;
  }
}

TEST(CudaConvert, ReportsAMissingDeviceAsAnError) {
  if (cuda::deviceCount() > 0)
    GTEST_SKIP() << "a CUDA device is present";
  uint16_t one = 0x3F80;
  float out;
  Status status = cuda::convertBfloat16ToF32(&one, 1, &out);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("no CUDA device"), std::string::npos);
}
