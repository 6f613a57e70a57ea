//===- QuantKernelsTest.cpp - Quant formats and CPU kernels vs reference --===//
//
// Part of moec. Every format (2/3/4/8 bits, groups 32/64/128, symmetric
// and asymmetric, fp16 and bf16 scales) on odd shapes (columns that are not
// a multiple of the group, few rows), on random and real weights.
//
//===----------------------------------------------------------------------===//

#include "cpu/QuantKernels.h"
#include "common/GroupPlanes.h"
#include "common/QuantFormat.h"
#include "common/RowTiles.h"
#include "common/WeightFormat.h"
#include "moe/Frontend/Checkpoint.h"

#include "TestSupport.h"

#include <cmath>
#include <cstring>
#include <random>

using namespace moe;
using namespace moe::quant;
using namespace moe::testing;

namespace {

std::vector<QuantFormat> allFormats() {
  std::vector<QuantFormat> formats;
  for (const BitsTraits &traits : kBitsTraits)
    for (int group : kGroupSizes)
      for (bool symmetric : {true, false})
        for (ScaleType scale : {ScaleType::F16, ScaleType::BF16})
          formats.push_back({traits.bits, group, symmetric, scale});
  return formats;
}

std::vector<float> randomMatrix(int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  std::vector<float> values(static_cast<size_t>(rows * cols));
  for (float &v : values)
    v = normal(rng);
  values[3] = 0.4f; // an outlier
  return values;
}

/// The largest gap between neighbouring values the group can represent.
float groupStep(const QuantFormat &format, const uint8_t *data, int64_t cols, int64_t row, int64_t column) {
  const uint8_t *group = data + row * format.rowBytes(cols) + (column / format.group) * format.groupBytes();
  uint16_t bits;
  std::memcpy(&bits, group, 2);
  return std::fabs(scaleToFloat(bits, format.scaleType));
}

/// Checks the kernel against the scalar reference (same activation
/// quantization) and against the dequantized f32 product, whose gap is
/// bounded by the activation rounding: sum |w| * blockScale / 2.
void checkKernels(const QuantFormat &format, const std::vector<float> &matrix, int64_t rows, int64_t cols,
                  uint32_t seed) {
  std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
  quantizeReference(format, matrix.data(), rows, cols, packed.data());
  std::vector<float> dequantized(matrix.size());
  dequantizeReference(format, packed.data(), rows, cols, dequantized.data());
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(cols));
  for (float &v : x)
    v = normal(rng);
  QuantizedActivation activation;
  quantizeActivation(x.data(), cols, format.group, activation);
  QuantMatrixView view{format, packed.data(), rows, cols};
  std::vector<float> fast(static_cast<size_t>(rows)), scalar(static_cast<size_t>(rows));
  gemvRowsScalar(view, activation, 0, rows, scalar.data());
  // Every instruction set the machine has agrees with the scalar kernel.
  for (const char *isa : availableIsas()) {
    std::vector<float> other(static_cast<size_t>(rows));
    gemvRowsWithIsa(isa, view, activation, 0, rows, other.data());
    for (int64_t r = 0; r < rows; ++r)
      EXPECT_NEAR(other[r], scalar[r], 1e-5 * (std::fabs(scalar[r]) + 1.0)) << format.name() << " " << isa;
  }
  gemvRows(view, activation, 0, rows, fast.data());
  // From row tiles made once (common/RowTiles.h), where the machine reads
  // them, over ranges that start and end inside a tile.
  std::vector<uint8_t> tiles(rowTileLayout(format, rows, cols).totalBytes);
  packRowTiles(view, tiles.data());
  QuantMatrixView tiled = view;
  tiled.tiles = tiles.data();
  for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, rows}, {rows / 3, rows - rows / 5}}) {
    std::vector<float> fromTiles(static_cast<size_t>(end - begin), -1.0f);
    gemvRows(tiled, activation, begin, end, fromTiles.data());
    for (int64_t r = begin; r < end; ++r)
      EXPECT_NEAR(fromTiles[r - begin], scalar[r], 1e-5 * (std::fabs(scalar[r]) + 1.0))
          << format.name() << " from tiles, row " << r << " of [" << begin << ", " << end << ")";
  }
  std::vector<float> rowsOut(static_cast<size_t>(rows * cols));
  dequantizeRows(view, 0, rows, rowsOut.data());
  EXPECT_EQ(rowsOut, dequantized);
  for (int64_t r = 0; r < rows; ++r) {
    double exact = 0, magnitude = 0, activationBound = 0;
    for (int64_t c = 0; c < cols; ++c) {
      exact += static_cast<double>(dequantized[r * cols + c]) * x[c];
      magnitude += std::fabs(static_cast<double>(dequantized[r * cols + c]) * x[c]);
      activationBound += std::fabs(dequantized[r * cols + c]) * activation.blockScales[c / format.group] * 0.5;
    }
    EXPECT_NEAR(fast[r], scalar[r], 1e-5 * magnitude + 1e-6) << format.name() << " row " << r;
    EXPECT_NEAR(fast[r], exact, activationBound * 1.01 + 1e-5 * magnitude + 1e-6) << format.name() << " row " << r;
  }
}

} // namespace

TEST(QuantFormat, NamesRoundTripAndBadFormatsAreNamed) {
  for (const QuantFormat &format : allFormats()) {
    auto parsed = parseQuantFormat(format.name());
    ASSERT_TRUE(parsed.has_value()) << format.name();
    EXPECT_EQ(*parsed, format);
    EXPECT_EQ(validateQuantFormat(format), "");
  }
  EXPECT_FALSE(parseQuantFormat("q5_g128_asym").has_value());
  EXPECT_FALSE(parseQuantFormat("q4_g100_sym").has_value());
  EXPECT_NE(validateQuantFormat({5, 128, true}).find("bits must be 2, 3, 4 or 8, got 5"), std::string::npos);
  EXPECT_NE(validateQuantFormat({4, 96, true}).find("group must be 32, 64 or 128, got 96"), std::string::npos);
  EXPECT_EQ(QuantFormat({4, 128, false}).matrixBytes(3, 200), 3u * 2 * (4 + 64));
}

TEST(QuantFormat, CodesPackAndUnpackAtEveryWidth) {
  for (const BitsTraits &traits : kBitsTraits) {
    std::vector<uint8_t> codes(static_cast<size_t>(128 * traits.bits / 8), 0);
    for (int i = 0; i < 128; ++i)
      packCode(codes.data(), traits.bits, i, (i * 7 + 3) % (1 << traits.bits));
    for (int i = 0; i < 128; ++i)
      EXPECT_EQ(unpackCode(codes.data(), traits.bits, i), (i * 7 + 3) % (1 << traits.bits)) << traits.bits;
  }
}

TEST(QuantFormat, RoundTripErrorIsHalfAStepForEveryFormat) {
  const int64_t rows = 5, cols = 200; // 200 is not a multiple of any group
  std::vector<float> matrix = randomMatrix(rows, cols, 1);
  for (const QuantFormat &format : allFormats()) {
    std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
    quantizeReference(format, matrix.data(), rows, cols, packed.data());
    std::vector<float> back(matrix.size());
    dequantizeReference(format, packed.data(), rows, cols, back.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const float step = groupStep(format, packed.data(), cols, r, c);
        EXPECT_LE(std::fabs(back[r * cols + c] - matrix[r * cols + c]), 0.5f * step * 1.02f + 1e-6f)
            << format.name() << " at " << r << "," << c;
      }
    // More bits, less error.
  }
  auto meanError = [&](int bits) {
    QuantFormat format{bits, 32, false};
    std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
    quantizeReference(format, matrix.data(), rows, cols, packed.data());
    std::vector<float> back(matrix.size());
    dequantizeReference(format, packed.data(), rows, cols, back.data());
    double sum = 0;
    for (size_t i = 0; i < back.size(); ++i)
      sum += std::fabs(back[i] - matrix[i]);
    return sum / static_cast<double>(back.size());
  };
  EXPECT_GT(meanError(2), meanError(3));
  EXPECT_GT(meanError(3), meanError(4));
  EXPECT_GT(meanError(4), meanError(8));
}

// The CUDA products' layout: the same values at every (row, col), bit for
// bit, on shapes whose last group is short and whose rows are not 16-byte
// multiples; planes aligned for 16-byte loads.
TEST(NestedFormat, TheHighCodesComeBackExactlyAndTheLowPartIsAFittedLowBitMatrix) {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  EXPECT_FALSE(quant::parseWeightFormat("q4_g32_asym_n3"));
  EXPECT_FALSE(quant::parseWeightFormat("q2_g32_asym_n1"));
  EXPECT_FALSE(quant::parseWeightFormat("q8_g32_sym_n2"));
  for (const char *name : {"q4_g32_asym_n2", "q4_g128_sym_n2", "q8_g64_asym_bf16_n4", "q8_g32_sym_n4"}) {
    std::optional<quant::WeightFormat> format = quant::parseWeightFormat(name);
    ASSERT_TRUE(format && format->nested) << name;
    EXPECT_EQ(format->name(), name);
    const quant::NestedFormat &nested = *format->nested;
    const int64_t rows = 5, cols = 200; // a short last group
    std::vector<float> values(static_cast<size_t>(rows * cols));
    for (float &v : values)
      v = normal(rng);
    std::vector<uint8_t> high(nested.high.matrixBytes(rows, cols)), bytes(format->matrixBytes(rows, cols)),
        back(high.size());
    quant::quantizeReference(nested.high, values.data(), rows, cols, high.data());
    quant::nestCodes(nested, high.data(), values.data(), rows, cols, bytes.data());
    quant::unnestCodes(nested, bytes.data(), rows, cols, back.data());
    EXPECT_EQ(back, high) << name << ": the high codes, byte for byte";
    std::vector<float> fromHigh(values.size()), fromNested(values.size());
    quant::dequantizeReference(nested.high, high.data(), rows, cols, fromHigh.data());
    format->dequantize(bytes.data(), rows, cols, fromNested.data());
    EXPECT_EQ(fromNested, fromHigh) << name;
    // The low part alone is a matrix of the low format: its codes are the
    // high codes' top bits, and its fitted scales do at least as well as
    // the high scales stretched to the low step, and within 1.6x of
    // quantizing to the low format directly.
    const quant::QuantFormat low = nested.low();
    std::vector<float> fromLow(values.size()), direct(values.size());
    quant::dequantizeReference(low, bytes.data(), rows, cols, fromLow.data());
    std::vector<uint8_t> lowDirect(low.matrixBytes(rows, cols));
    quant::quantizeReference(low, values.data(), rows, cols, lowDirect.data());
    quant::dequantizeReference(low, lowDirect.data(), rows, cols, direct.data());
    double nestedError = 0, directError = 0, stretchedError = 0;
    const int shift = nested.high.bits - low.bits;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const size_t i = static_cast<size_t>(r * cols + c);
        const int64_t g = c / low.group;
        const uint8_t *highGroup = high.data() + r * nested.high.rowBytes(cols) + g * nested.high.groupBytes();
        const uint8_t *lowGroup = bytes.data() + r * low.rowBytes(cols) + g * low.groupBytes();
        const int code = quant::unpackCode(highGroup + nested.high.headerBytes(), nested.high.bits, c % low.group);
        EXPECT_EQ(quant::unpackCode(lowGroup + low.headerBytes(), low.bits, c % low.group), code >> shift);
        // The high step times 2^shift, centred in the codes the top bits cover.
        uint16_t scaleBits;
        std::memcpy(&scaleBits, highGroup, 2);
        const float scale = quant::scaleToFloat(scaleBits, nested.high.scaleType);
        const float stretched = fromHigh[i] + scale * (((1 << shift) - 1) / 2.0f - (code & ((1 << shift) - 1)));
        nestedError += (fromLow[i] - values[i]) * (fromLow[i] - values[i]);
        directError += (direct[i] - values[i]) * (direct[i] - values[i]);
        stretchedError += (stretched - values[i]) * (stretched - values[i]);
      }
    EXPECT_LE(nestedError, stretchedError * 1.0001) << name;
    EXPECT_LT(nestedError, 1.6 * directError) << name << ": nested " << nestedError << ", direct " << directError;
  }
}

TEST(GroupPlanes, SplittingKeepsEveryValueForEveryFormat) {
  const std::pair<int64_t, int64_t> shapes[] = {{1, 32}, {3, 200}, {5, 4099}, {2, 96}};
  for (const QuantFormat &format : allFormats())
    for (const auto &[rows, cols] : shapes) {
      SCOPED_TRACE(format.name() + " " + std::to_string(rows) + "x" + std::to_string(cols));
      const std::vector<float> weights = randomMatrix(rows, cols, static_cast<uint32_t>(rows * cols + format.bits));
      std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
      quantizeReference(format, weights.data(), rows, cols, packed.data());
      std::vector<float> reference(static_cast<size_t>(rows * cols));
      dequantizeReference(format, packed.data(), rows, cols, reference.data());
      const GroupPlanes planes = groupPlanes(format, rows, cols);
      EXPECT_EQ(planes.codeRowBytes % 16, 0u);
      EXPECT_EQ(planes.headerOffset % 16, 0u);
      EXPECT_GE(planes.codeRowBytes, static_cast<size_t>(planes.groups) * format.codeBytes());
      EXPECT_EQ(planes.blockBytes * static_cast<size_t>(format.group / kCodeBlock), format.codeBytes());
      std::vector<uint8_t> split(planes.totalBytes, 0xAB);
      splitIntoPlanes(format, rows, cols, packed.data(), split.data());
      size_t mismatches = 0;
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          mismatches += planesValue(format, planes, split.data(), r, c) != reference[static_cast<size_t>(r * cols + c)];
      EXPECT_EQ(mismatches, 0u);
      // Padding is zeros, not what the buffer held.
      for (int64_t r = 0; r < rows; ++r)
        for (size_t i = static_cast<size_t>(planes.groups) * format.codeBytes(); i < planes.codeRowBytes; ++i)
          ASSERT_EQ(split[static_cast<size_t>(r) * planes.codeRowBytes + i], 0);
    }
}

// Row tiles hold the package's bytes moved (two's complement codes offset
// by 128; 3-bit codes a byte each): the kernels' layout pass writes the scalar reference's bytes for
// every format, with and without signed codes, on shapes that leave a
// partial last tile and a short last group.
TEST(RowTiles, PackingEqualsTheScalarReference) {
  for (const QuantFormat &format : allFormats())
    for (bool signedCodes : {false, true})
      for (auto [rows, cols] : {std::pair<int64_t, int64_t>{1, 32}, {17, 200}, {38, 1000}, {16, 4096}}) {
        if (signedCodes && format.name() != "q8_g32_sym")
          continue;
        const std::vector<float> matrix = randomMatrix(rows, cols, 13);
        std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
        quantizeReference(format, matrix.data(), rows, cols, packed.data());
        const RowTileLayout layout = rowTileLayout(format, rows, cols);
        if (format.bits != 3) // 3-bit tiles hold a byte per code
          EXPECT_EQ(layout.tileBytes, format.rowBytes(cols) * kTileRows) << "the same bytes, moved";
        std::vector<uint8_t> fast(layout.totalBytes, 0xee), reference(layout.totalBytes, 0x11);
        packRowTiles(QuantMatrixView{format, packed.data(), rows, cols, signedCodes}, fast.data());
        packRowTilesReference(format, signedCodes, packed.data(), rows, cols, reference.data());
        EXPECT_EQ(fast, reference) << format.name() << (signedCodes ? " signed " : " ") << rows << "x" << cols;
      }
}

TEST(QuantKernels, GemvMatchesTheScalarReferenceOnRandomWeights) {
  for (const QuantFormat &format : allFormats())
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{7, 200}, {3, 32}, {9, 129}, {16, 384}})
      checkKernels(format, randomMatrix(rows, cols, static_cast<uint32_t>(rows * cols)), rows, cols, 5);
}

TEST(QuantKernels, GemvMatchesTheScalarReferenceOnRealWeights) {
  auto checkpoint = Checkpoint::open(dataDir() + "/fixtures/tiny-mixtral");
  ASSERT_TRUE(checkpoint.ok());
  for (const char *name :
       {"model.layers.0.block_sparse_moe.experts.3.w1.weight", "model.layers.2.block_sparse_moe.experts.5.w2.weight"}) {
    std::vector<float> weights;
    ASSERT_TRUE((*checkpoint)->loadF32(name, weights).ok());
    const TensorLocation *where = (*checkpoint)->find(name);
    const int64_t rows = where->info->shape[0], cols = where->info->shape[1];
    for (const QuantFormat &format : allFormats())
      checkKernels(format, weights, rows, cols, 9);
  }
}

TEST(QuantKernels, DispatchNamesItsInstructionSet) {
  std::string isa = kernelIsa();
  EXPECT_TRUE(isa == "avx512-vnni" || isa == "avx-vnni" || isa == "avx2" || isa == "scalar") << isa;
  EXPECT_EQ(std::string(availableIsas().front()), isa);
  EXPECT_EQ(std::string(availableIsas().back()), "scalar");
}

// Prefill's integer GEMM (eight tokens per pass, here 11 so a pass is
// partial, and one; tiles of 16 rows, here whole, partial and alone) equals
// the scalar GEMV token by token, for every format on odd shapes, written at
// a row stride wider than the row range.
TEST(QuantKernels, GemmMatchesTheScalarGemvTokenByToken) {
  for (const int64_t count : {int64_t(11), int64_t(1)})
    for (const QuantFormat &format : allFormats())
      for (auto [rows, cols] :
           {std::pair<int64_t, int64_t>{7, 200}, {5, 129}, {3, 384}, {4, 32}, {38, 200}, {18, 1000}}) {
        const std::vector<float> matrix = randomMatrix(rows, cols, 5);
        std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
        quantizeReference(format, matrix.data(), rows, cols, packed.data());
        const QuantMatrixView view{format, packed.data(), rows, cols};
        std::vector<QuantizedActivation> activations(count);
        std::mt19937 rng(9);
        std::normal_distribution<float> normal(0.0f, 1.0f);
        for (QuantizedActivation &activation : activations) {
          std::vector<float> x(static_cast<size_t>(cols));
          for (float &v : x)
            v = normal(rng);
          quantizeActivation(x.data(), cols, format.group, activation);
        }
        const int64_t ldy = rows + 3;
        std::vector<uint8_t> tiles(rowTileLayout(format, rows, cols).totalBytes);
        packRowTiles(view, tiles.data());
        QuantMatrixView tiled = view;
        tiled.tiles = tiles.data();
        for (const QuantMatrixView *matrix : {&view, static_cast<const QuantMatrixView *>(&tiled)}) {
          std::vector<float> y(static_cast<size_t>(count * ldy), -1.0f), expected(static_cast<size_t>(rows));
          gemmRows(*matrix, activations.data(), count, 1, rows, y.data(), ldy);
          for (int64_t t = 0; t < count; ++t) {
            gemvRowsScalar(view, activations[t], 1, rows, expected.data());
            for (int64_t r = 1; r < rows; ++r)
              EXPECT_NEAR(y[t * ldy + r - 1], expected[r - 1], 1e-5 * (std::fabs(expected[r - 1]) + 1.0))
                  << format.name() << " " << rows << "x" << cols << " token " << t << " row " << r
                  << (matrix->tiles ? " from tiles" : "");
            for (int64_t r = rows - 1; r < ldy; ++r)
              EXPECT_EQ(y[t * ldy + r], -1.0f) << "beyond the row range";
          }
        }
      }
}

// The activation quantizer the kernels use (AVX-512 where they use it)
// gives the scalar reference's values, scales and sums exactly: on odd
// lengths, a zero group, and products that land on halves (lround rounds
// them away from zero).
TEST(QuantKernels, ActivationQuantizationEqualsTheScalarReference) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int group : kGroupSizes)
    for (int64_t cols : {int64_t(1), int64_t(17), int64_t(200), int64_t(384), int64_t(1000)}) {
      std::vector<float> x(static_cast<size_t>(cols));
      for (float &v : x)
        v = normal(rng);
      // Halves: with a maximum of 127 the inverse scale is 1, so k + 0.5
      // stays k + 0.5 after the multiply.
      x[0] = 127.0f;
      for (int64_t i = 1; i < std::min<int64_t>(cols, 8); ++i)
        x[i] = (i % 2 ? 1.0f : -1.0f) * (static_cast<float>(2 * (i - 1)) + 0.5f); // 0.5, -2.5, 4.5, ...
      if (cols > group)
        std::fill(x.begin() + group, x.begin() + std::min<int64_t>(cols, 2 * group), 0.0f);
      QuantizedActivation fast, reference;
      quantizeActivation(x.data(), cols, group, fast);
      quantizeActivationScalar(x.data(), cols, group, reference);
      EXPECT_EQ(fast.values, reference.values) << group << " " << cols;
      EXPECT_EQ(fast.blockScales, reference.blockScales) << group << " " << cols;
      EXPECT_EQ(fast.groupSums, reference.groupSums) << group << " " << cols;
      if (cols >= 8)
        EXPECT_EQ(reference.values[1], 1) << "0.5 rounds away from zero (not to even)";
      if (cols >= 8)
        EXPECT_EQ(reference.values[2], -3) << "-2.5 rounds away from zero (not to even)";
    }
}
