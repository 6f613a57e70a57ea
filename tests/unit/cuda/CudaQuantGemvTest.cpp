//===- CudaQuantGemvTest.cpp - The CUDA quantized GEMV vs the reference ---===//
//
// Part of moec. Every format of kernels/common against the scalar
// reference's dequantized values; skips the GPU cases without a device
// (and then checks the error instead).
//
//===----------------------------------------------------------------------===//

#include "cuda/QuantGemv.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

using namespace moe;

namespace {

bool haveDevice() {
  std::vector<float> y(1);
  std::vector<uint8_t> w(quant::QuantFormat{}.matrixBytes(1, 32));
  std::vector<float> x(32);
  return cuda::gemvQuantized(quant::QuantFormat{}, w.data(), 1, 32, x.data(), y.data()).ok();
}

/// GPU y against the reference's dequantized matrix times x (in double).
void expectMatchesReference(const quant::QuantFormat &format, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> weights(static_cast<size_t>(rows * cols)), x(static_cast<size_t>(cols));
  for (float &w : weights)
    w = 0.05f * normal(rng);
  for (float &v : x)
    v = normal(rng);
  std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
  quant::quantizeReference(format, weights.data(), rows, cols, packed.data());
  std::vector<float> dequantized(weights.size());
  quant::dequantizeReference(format, packed.data(), rows, cols, dequantized.data());
  std::vector<float> y(static_cast<size_t>(rows));
  Status status = cuda::gemvQuantized(format, packed.data(), rows, cols, x.data(), y.data());
  ASSERT_TRUE(status.ok()) << status.message();
  for (int64_t r = 0; r < rows; ++r) {
    double expected = 0, magnitude = 0;
    for (int64_t c = 0; c < cols; ++c) {
      expected += static_cast<double>(dequantized[r * cols + c]) * x[c];
      magnitude += std::fabs(static_cast<double>(dequantized[r * cols + c]) * x[c]);
    }
    ASSERT_NEAR(y[r], expected, 1e-5 * magnitude + 1e-6)
        << format.name() << " row " << r << " of " << rows << "x" << cols;
  }
}

void expectError(const Status &status, const std::string &fragment) {
  ASSERT_FALSE(status.ok()) << "expected an error containing: " << fragment;
  EXPECT_NE(status.message().find(fragment), std::string::npos) << status.message();
}

} // namespace

TEST(CudaQuantGemv, EveryFormatMatchesTheReferenceOnOddShapes) {
  if (!haveDevice())
    GTEST_SKIP() << "no CUDA device";
  for (int bits : {2, 3, 4, 8})
    for (int group : {32, 64, 128})
      for (bool symmetric : {false, true})
        for (quant::ScaleType scale : {quant::ScaleType::F16, quant::ScaleType::BF16}) {
          quant::QuantFormat format{bits, group, symmetric, scale};
          // 257 rows (a partial warp), 1000 columns (a partial block and group).
          expectMatchesReference(format, 257, 1000, static_cast<uint32_t>(bits * 1000 + group));
        }
}

TEST(CudaQuantGemv, FewRowsSplitTheColumnsAndStillAddUp) {
  if (!haveDevice())
    GTEST_SKIP() << "no CUDA device";
  // 40 rows cannot fill the GPU: the columns are split into slices whose
  // partial sums are added with atomics.
  expectMatchesReference(quant::QuantFormat{4, 128, false}, 40, 14336, 7);
  expectMatchesReference(quant::QuantFormat{3, 64, true}, 33, 4096 + 32, 8);
}

TEST(CudaQuantGemv, BadArgumentsAndAMissingDeviceAreErrors) {
  std::vector<float> x(64), y(2);
  std::vector<uint8_t> w(quant::QuantFormat{}.matrixBytes(2, 64) + 4);
  // Arguments are checked before the GPU is touched (so also without one).
  alignas(16) float aligned[68] = {};
  expectError(cuda::gemvQuantizedDevice(quant::QuantFormat{}, w.data(), 2, 64, aligned + 1, y.data()),
              "x must be 16-byte aligned");
  const uint8_t *odd = reinterpret_cast<const uint8_t *>((reinterpret_cast<uintptr_t>(w.data()) | 3));
  expectError(cuda::gemvQuantizedDevice(quant::QuantFormat{4, 128, false}, odd, 2, 64, aligned, y.data()),
              "the weights must be 4-byte aligned");
  expectError(cuda::gemvQuantizedDevice(quant::QuantFormat{}, w.data(), -1, 64, aligned, y.data()),
              "negative shape -1x64");
  Status bad = cuda::gemvQuantized(quant::QuantFormat{5, 128, false}, w.data(), 2, 64, x.data(), y.data());
  ASSERT_FALSE(bad.ok());
  if (haveDevice()) {
    EXPECT_NE(bad.message().find("bits"), std::string::npos) << bad.message();
    return;
  }
  EXPECT_NE(bad.message().find("no CUDA device available"), std::string::npos) << bad.message();
}
