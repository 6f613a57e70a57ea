//===- GgmlFormatsTest.cpp - llama.cpp's block formats against gguf -------===//
//
// Part of moec. The dequantization of every ggml block format equals the
// Python gguf package's bit for bit (goldens from
// scripts/fixtures/ggml_goldens.py); the quantizer's error stays within
// what each width allows; GPTQ's two steps equal the row quantizer.
//
//===----------------------------------------------------------------------===//

#include "common/GgmlFormats.h"
#include "cpu/GgmlKernels.h"
#include "cpu/QuantKernels.h"
#include "moe/Frontend/Safetensors.h"

#include "TestSupport.h"

#include <cmath>
#include <cstring>
#include <random>

using namespace moe;
using namespace moe::quant;
using namespace moe::testing;

namespace {

const GgmlType kBlockTypes[] = {GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0,
                                GgmlType::Q2_K, GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K};

std::vector<float> randomRow(int64_t n, uint32_t seed, float offset = 0.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> row(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i)
    row[i] = normal(rng) * (1.0f + static_cast<float>(i % 7) * 0.3f) * 0.02f + offset;
  return row;
}

} // namespace

TEST(GgmlFormats, DequantizationEqualsPythonGgufBitForBit) {
  auto file = SafetensorsFile::open(dataDir() + "/ggml/goldens.safetensors");
  ASSERT_TRUE(file.ok()) << file.status().message();
  for (GgmlType type : kBlockTypes) {
    const GgmlTraits *traits = ggmlTraits(type);
    const TensorInfo *blocks = (*file)->find(std::string(traits->name) + ".blocks");
    const TensorInfo *values = (*file)->find(std::string(traits->name) + ".values");
    ASSERT_TRUE(blocks && values) << traits->name;
    const int64_t count = values->numElements();
    ASSERT_EQ(static_cast<size_t>(blocks->numElements()), ggmlRowBytes(type, count)) << traits->name;
    std::vector<float> out(static_cast<size_t>(count));
    ggmlDequantizeRow(type, (*file)->data(*blocks).data(), count, out.data());
    const uint8_t *expected = (*file)->data(*values).data();
    int64_t different = 0;
    for (int64_t i = 0; i < count; ++i)
      different += std::memcmp(&out[i], expected + 4 * i, 4) != 0;
    EXPECT_EQ(different, 0) << traits->name << ": " << different << " of " << count << " values differ";
  }
}

TEST(GgmlFormats, TraitsAndNames) {
  for (GgmlType type : kBlockTypes) {
    const GgmlTraits *traits = ggmlTraits(type);
    ASSERT_NE(traits, nullptr);
    EXPECT_EQ(ggmlBlockFormat(traits->name), traits);
    EXPECT_EQ(ggmlRowBytes(type, 512), static_cast<size_t>(512 / traits->blockSize * traits->blockBytes));
  }
  EXPECT_EQ(ggmlBlockFormat("q4_g32_sym"), nullptr);
  EXPECT_EQ(ggmlBlockFormat("f16"), nullptr);
}

// Relative RMS error of quantize -> dequantize on Gaussian rows with a
// per-column spread, for each format: within what its width allows, and
// ordered by bits where the formats are alike.
TEST(GgmlFormats, QuantizerErrorFitsEachWidth) {
  const int64_t n = 4096;
  std::map<GgmlType, double> error;
  for (GgmlType type : kBlockTypes)
    for (float offset : {0.0f, 0.01f}) {
      std::vector<float> row = randomRow(n, 7, offset), back(n);
      std::vector<uint8_t> packed(ggmlRowBytes(type, n));
      ggmlQuantizeRow(type, row.data(), n, packed.data());
      ggmlDequantizeRow(type, packed.data(), n, back.data());
      double num = 0, den = 0;
      for (int64_t i = 0; i < n; ++i) {
        num += (back[i] - row[i]) * (back[i] - row[i]);
        den += row[i] * row[i];
      }
      error[type] = std::max(error[type], std::sqrt(num / den));
    }
  const std::map<GgmlType, double> bound = {{GgmlType::Q2_K, 0.45}, {GgmlType::Q3_K, 0.22}, {GgmlType::Q4_0, 0.13},
                                            {GgmlType::Q4_1, 0.12}, {GgmlType::Q4_K, 0.10}, {GgmlType::Q5_0, 0.065},
                                            {GgmlType::Q5_1, 0.06}, {GgmlType::Q5_K, 0.05}, {GgmlType::Q6_K, 0.03},
                                            {GgmlType::Q8_0, 0.006}};
  for (GgmlType type : kBlockTypes)
    EXPECT_LT(error[type], bound.at(type)) << ggmlTraits(type)->name;
  EXPECT_LT(error[GgmlType::Q3_K], error[GgmlType::Q2_K]);
  EXPECT_LT(error[GgmlType::Q4_K], error[GgmlType::Q3_K]);
  EXPECT_LT(error[GgmlType::Q5_K], error[GgmlType::Q4_K]);
  EXPECT_LT(error[GgmlType::Q6_K], error[GgmlType::Q5_K]);
  EXPECT_LT(error[GgmlType::Q8_0], error[GgmlType::Q6_K]);
}

// Importance weights move error to the unimportant values.
TEST(GgmlFormats, ImportanceWeightsLowerTheWeightedError) {
  const int64_t n = 2048;
  std::vector<float> row = randomRow(n, 11), importance(n), back(n);
  for (int64_t i = 0; i < n; ++i)
    importance[i] = (i % 5 == 0) ? 50.0f : 1.0f;
  for (GgmlType type : kBlockTypes) {
    double weighted[2];
    for (int use = 0; use < 2; ++use) {
      std::vector<uint8_t> packed(ggmlRowBytes(type, n));
      ggmlQuantizeRow(type, row.data(), n, packed.data(), use ? importance.data() : nullptr);
      ggmlDequantizeRow(type, packed.data(), n, back.data());
      weighted[use] = 0;
      for (int64_t i = 0; i < n; ++i)
        weighted[use] += importance[i] * (back[i] - row[i]) * (back[i] - row[i]);
    }
    EXPECT_LE(weighted[1], weighted[0] * 1.0001) << ggmlTraits(type)->name;
  }
}

// GPTQ quantizes a block in two steps; together they are the row quantizer,
// and each value's returned reconstruction is what dequantization reads.
TEST(GgmlFormats, ChooseThenQuantizeEqualsTheRowQuantizer) {
  for (GgmlType type : kBlockTypes) {
    const GgmlTraits *traits = ggmlTraits(type);
    const int64_t n = 2 * traits->blockSize;
    std::vector<float> row = randomRow(n, 3, 0.004f), returned(n), back(n);
    std::vector<uint8_t> whole(ggmlRowBytes(type, n)), steps(whole.size());
    ggmlQuantizeRow(type, row.data(), n, whole.data());
    for (int64_t b = 0; b < 2; ++b) {
      uint8_t *block = steps.data() + b * traits->blockBytes;
      ggmlChooseScales(type, row.data() + b * traits->blockSize, nullptr, block);
      for (int i = 0; i < traits->blockSize; ++i)
        returned[b * traits->blockSize + i] = ggmlQuantizeValue(type, block, i, row[b * traits->blockSize + i]);
    }
    EXPECT_EQ(whole, steps) << traits->name;
    ggmlDequantizeRow(type, steps.data(), n, back.data());
    EXPECT_EQ(returned, back) << traits->name;
  }
}

// Zeros stay zero in every format (padding, pruned neurons).
TEST(GgmlFormats, ZerosStayZero) {
  for (GgmlType type : kBlockTypes) {
    const int64_t n = 256;
    std::vector<float> row = randomRow(n, 5), back(n);
    for (int64_t i = 0; i < n; i += 3)
      row[i] = 0.0f;
    std::vector<float> zeros(n, 0.0f);
    std::vector<uint8_t> packed(ggmlRowBytes(type, n));
    ggmlQuantizeRow(type, zeros.data(), n, packed.data());
    ggmlDequantizeRow(type, packed.data(), n, back.data());
    for (float v : back)
      ASSERT_EQ(v, 0.0f) << ggmlTraits(type)->name;
  }
}

// The GEMV over blocks read in place equals the dot products of the
// reference's values (up to float summation order), on odd row counts.
TEST(GgmlKernels, GemvMatchesTheReferenceValues) {
  for (GgmlType type : kBlockTypes) {
    const GgmlTraits *traits = ggmlTraits(type);
    const int64_t rows = 7, cols = 3 * traits->blockSize;
    std::vector<float> matrix = randomRow(rows * cols, 21), x = randomRow(cols, 22), values(rows * cols);
    const size_t rowBytes = ggmlRowBytes(type, cols);
    std::vector<uint8_t> packed(rowBytes * rows);
    ggmlQuantizeRows(type, matrix.data(), rows, cols, packed.data());
    ggmlDequantizeRows(type, packed.data(), cols, 0, rows, values.data());
    std::vector<float> y(rows);
    ggmlGemvRows(type, packed.data(), cols, x.data(), 2, rows, y.data());
    for (int64_t r = 2; r < rows; ++r) {
      double expected = 0, magnitude = 0;
      for (int64_t c = 0; c < cols; ++c) {
        expected += static_cast<double>(values[r * cols + c]) * x[c];
        magnitude += std::fabs(static_cast<double>(values[r * cols + c]) * x[c]);
      }
      EXPECT_NEAR(y[r - 2], expected, 1e-5 * magnitude)
          << traits->name << " row " << r << " (" << ggmlKernelIsa() << ")";
    }
    std::vector<float> row(cols);
    ggmlDequantizeRow(type, packed.data() + 4 * rowBytes, cols, row.data());
    EXPECT_TRUE(std::equal(row.begin(), row.end(), values.begin() + 4 * cols)) << traits->name;
  }
}

// Q4_0, Q4_1 and Q8_0 rows are group-format rows: the group kernels read
// them in place, and every instruction set agrees with the scalar kernel
// and with the gguf reference's values, on an odd number of blocks.
TEST(GgmlKernels, SmallBlockFormatsRunInTheGroupKernels) {
  for (GgmlType type : {GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0}) {
    const std::optional<GgmlGroupLayout> layout = ggmlGroupLayout(type);
    ASSERT_TRUE(layout.has_value()) << ggmlTraits(type)->name;
    const int64_t rows = 5, cols = 7 * 32;
    std::vector<float> matrix = randomRow(rows * cols, 31, 0.01f), x = randomRow(cols, 32), values(rows * cols);
    std::vector<uint8_t> packed(ggmlRowBytes(type, cols) * rows);
    ASSERT_EQ(packed.size(), layout->format.matrixBytes(rows, cols));
    ggmlQuantizeRows(type, matrix.data(), rows, cols, packed.data());
    ggmlDequantizeRows(type, packed.data(), cols, 0, rows, values.data());
    QuantMatrixView view{layout->format, packed.data(), rows, cols, layout->signedCodes};
    std::vector<float> asGroups(values.size());
    dequantizeRows(view, 0, rows, asGroups.data());
    EXPECT_EQ(asGroups, values) << ggmlTraits(type)->name;
    QuantizedActivation activation;
    quantizeActivation(x.data(), cols, 32, activation);
    std::vector<float> scalar(rows);
    gemvRowsScalar(view, activation, 0, rows, scalar.data());
    for (int64_t r = 0; r < rows; ++r) {
      double exact = 0, bound = 0, magnitude = 0;
      for (int64_t c = 0; c < cols; ++c) {
        exact += static_cast<double>(values[r * cols + c]) * x[c];
        magnitude += std::fabs(static_cast<double>(values[r * cols + c]) * x[c]);
        bound += std::fabs(values[r * cols + c]) * activation.blockScales[c / 32] * 0.5;
      }
      EXPECT_NEAR(scalar[r], exact, bound * 1.01 + 1e-5 * magnitude) << ggmlTraits(type)->name << " row " << r;
    }
    for (const char *isa : availableIsas()) {
      std::vector<float> y(rows);
      gemvRowsWithIsa(isa, view, activation, 0, rows, y.data());
      for (int64_t r = 0; r < rows; ++r)
        EXPECT_NEAR(y[r], scalar[r], 1e-5 * (std::fabs(scalar[r]) + 1.0)) << ggmlTraits(type)->name << " " << isa;
    }
    // Prefill's integer GEMM over three tokens (the same activation).
    const std::vector<QuantizedActivation> three(3, activation);
    std::vector<float> block(3 * rows);
    gemmRows(view, three.data(), 3, 0, rows, block.data(), rows);
    for (int64_t t = 0; t < 3; ++t)
      for (int64_t r = 0; r < rows; ++r)
        EXPECT_NEAR(block[t * rows + r], scalar[r], 1e-5 * (std::fabs(scalar[r]) + 1.0)) << ggmlTraits(type)->name;
  }
  EXPECT_FALSE(ggmlGroupLayout(GgmlType::Q4_K).has_value());
}
