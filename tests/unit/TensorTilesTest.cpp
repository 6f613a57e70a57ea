//===- TensorTilesTest.cpp - The tensor-core product kernel, played on the CPU ---===//
//
// Part of moec. The warp's work of the CUDA tensor-core kernel
// (kernels/cuda/TensorTiles.h) runs here as it is written for the device:
// 32 threads, one per lane, each with its own fragments, meeting at every
// mma.sync, which tensor::referenceMma computes from the PTX ISA's fragment
// tables for mma.m16n8k32 with 8-bit integers (written apart from the
// kernel's own mapping). The products of whole tiles, with rows and tokens
// past the tile's end and short last groups, are checked against the CPU's
// scalar kernel, for every group format and ggml's signed Q8_0; the code
// fragments against the package's codes. The GPU runs the same code in
// CudaEngineTest when one is present.
//
//===----------------------------------------------------------------------===//

#include "cuda/TensorTiles.h"
#include "common/GroupPlanes.h"
#include "cpu/QuantKernels.h"

#include <gtest/gtest.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

using namespace moe;
namespace tensor = moe::cuda::tensor;

namespace {

/// One warp's shared view at an mma.sync: every lane's A and B registers.
struct EmulatedWarp {
  std::barrier<> meet{32};
  unsigned a[32][4] = {}, b[32][2] = {};
};

/// One lane's MMA: its fragments to the warp, tensor::referenceMma of all.
struct LaneMma {
  EmulatedWarp *warp;
  int lane;
  void operator()(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], bool signedCodes) {
    std::memcpy(warp->a[lane], a, sizeof(a));
    std::memcpy(warp->b[lane], b, sizeof(b));
    warp->meet.arrive_and_wait();
    tensor::referenceMma(d, lane, warp->a, warp->b, signedCodes);
    warp->meet.arrive_and_wait(); // No lane overwrites its registers before all have read them.
  }
};

/// Runs every tile of `job` as 32 threads.
template <int BITS> void runTiles(const cuda::ProductJob &job) {
  const int64_t tiles = tensor::tileCount(job.rows, job.tokens);
  for (int64_t tile = 0; tile < tiles; ++tile) {
    EmulatedWarp warp;
    std::vector<std::thread> lanes;
    for (int lane = 0; lane < 32; ++lane)
      lanes.emplace_back([&job, tile, lane, &warp] {
        LaneMma mma{&warp, lane};
        tensor::tensorTile<BITS>(job, tile, lane, mma);
      });
    for (std::thread &thread : lanes)
      thread.join();
  }
}

void runTiles(const cuda::ProductJob &job) {
  switch (job.bits) {
  case 2:
    return runTiles<2>(job);
  case 3:
    return runTiles<3>(job);
  case 4:
    return runTiles<4>(job);
  default:
    return runTiles<8>(job);
  }
}

/// A random matrix in `format` (signed: random Q8_0 codes and small scales).
std::vector<uint8_t> randomMatrix(const quant::QuantFormat &format, bool signedCodes, int64_t rows, int64_t cols,
                                  std::mt19937 &rng) {
  std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
  if (signedCodes) {
    for (uint8_t &byte : packed)
      byte = static_cast<uint8_t>(rng());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < format.groupsPerRow(cols); ++g) {
        const uint16_t scale = quant::floatToScale(0.001f * static_cast<float>(1 + rng() % 7), format.scaleType);
        std::memcpy(packed.data() + r * format.rowBytes(cols) + g * format.groupBytes(), &scale, 2);
      }
    return packed;
  }
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<size_t>(rows * cols));
  for (float &v : values)
    v = 0.05f * normal(rng);
  quant::quantizeReference(format, values.data(), rows, cols, packed.data());
  return packed;
}

struct Shape {
  int64_t rows, cols, tokens;
};

/// A tensor job of a [rows, cols] matrix in planes over `tokens` tokens of
/// x, and the CPU's y beside it.
void expectTilesMatchTheScalarKernel(const quant::QuantFormat &format, bool signedCodes, const Shape &shape,
                                     std::mt19937 &rng) {
  const std::vector<uint8_t> packed = randomMatrix(format, signedCodes, shape.rows, shape.cols, rng);
  const quant::GroupPlanes planes = quant::groupPlanes(format, shape.rows, shape.cols);
  std::vector<uint8_t> planar(planes.totalBytes + 16);
  quant::splitIntoPlanes(format, shape.rows, shape.cols, packed.data(), planar.data());
  const int64_t groups = format.groupsPerRow(shape.cols), stride = groups * format.group;
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<size_t>(shape.tokens * shape.cols));
  for (float &v : x)
    v = normal(rng);
  // The activations as quantizeKernel lays them out: [tokens, stride] int8
  // (zeros past cols), [tokens, groups] scales and sums.
  std::vector<int8_t> values(static_cast<size_t>(shape.tokens * stride), 0);
  std::vector<float> scales(static_cast<size_t>(shape.tokens * groups)), sums(scales.size());
  std::vector<float> expected(static_cast<size_t>(shape.tokens * shape.rows));
  const quant::QuantMatrixView view{format, packed.data(), shape.rows, shape.cols, signedCodes};
  for (int64_t t = 0; t < shape.tokens; ++t) {
    quant::QuantizedActivation activation;
    quant::quantizeActivationScalar(x.data() + t * shape.cols, shape.cols, format.group, activation);
    std::memcpy(values.data() + t * stride, activation.values.data(),
                std::min<size_t>(activation.values.size(), static_cast<size_t>(stride)));
    std::memcpy(scales.data() + t * groups, activation.blockScales.data(), static_cast<size_t>(groups) * 4);
    std::memcpy(sums.data() + t * groups, activation.groupSums.data(), static_cast<size_t>(groups) * 4);
    quant::gemvRowsScalar(view, activation, 0, shape.rows, expected.data() + t * shape.rows);
  }
  cuda::ProductJob job{};
  job.w = planar.data();
  job.rows = shape.rows;
  job.cols = shape.cols;
  job.layout = cuda::kGroupLayout;
  job.bits = format.bits;
  job.group = format.group;
  job.symmetric = format.symmetric;
  job.bf16Scale = format.scaleType == quant::ScaleType::BF16;
  job.signedCodes = signedCodes;
  job.blockShift = format.group == 128 ? 2 : format.group == 64 ? 1 : 0;
  job.codeRowBytes = static_cast<int64_t>(planes.codeRowBytes);
  job.headerOffset = static_cast<int64_t>(planes.headerOffset);
  job.q = values.data();
  job.qScales = scales.data();
  job.qSums = sums.data();
  job.groups = groups;
  const float unwritten = -12345.0f;
  std::vector<float> y(static_cast<size_t>(shape.tokens * (shape.rows + 3)), unwritten);
  job.y = y.data();
  job.ldy = shape.rows + 3; // A stride wider than the rows: the kernel writes only its own.
  job.tokens = shape.tokens;
  job.tensor = 1;
  runTiles(job);
  for (int64_t t = 0; t < shape.tokens; ++t) {
    for (int64_t r = 0; r < shape.rows; ++r) {
      // The same operations in the same order (products and sums rounded
      // one by one; the build fuses no multiply-adds): the same value.
      ASSERT_EQ(y[t * job.ldy + r], expected[t * shape.rows + r])
          << format.name() << (signedCodes ? " signed" : "") << " " << shape.rows << "x" << shape.cols << " over "
          << shape.tokens << " tokens: token " << t << " row " << r;
    }
    for (int64_t r = shape.rows; r < job.ldy; ++r)
      ASSERT_EQ(y[t * job.ldy + r], unwritten) << "written past the rows at token " << t;
  }
}

} // namespace

// The A fragment's registers hold tokens g and g + 8 at columns 4t and
// 16 + 4t, zeros past the last token.
TEST(TensorTiles, ActivationFragmentsFollowThePtxLayout) {
  const int64_t tokens = 21, stride = 96;
  std::vector<int8_t> q(static_cast<size_t>(tokens * stride));
  for (size_t i = 0; i < q.size(); ++i)
    q[i] = static_cast<int8_t>(i * 7 + 3);
  for (int64_t token0 : {0, 16})
    for (int64_t column : {0, 32, 64})
      for (int lane = 0; lane < 32; ++lane) {
        unsigned a[4];
        tensor::activationFragment(q.data(), stride, tokens, token0, column, lane, a);
        for (int r = 0; r < 4; ++r)
          for (int byte = 0; byte < 4; ++byte) {
            const int64_t token = token0 + lane / 4 + 8 * (r % 2);
            const int64_t col = column + (lane % 4) * 4 + 16 * (r / 2) + byte;
            const int8_t expected = token < tokens ? q[token * stride + col] : 0;
            EXPECT_EQ(static_cast<int8_t>((a[r] >> (8 * byte)) & 0xFF), expected)
                << "lane " << lane << " register " << r << " byte " << byte << " token0 " << token0;
          }
      }
}

// Each lane's B registers are the codes of its columns, for every width.
TEST(TensorTiles, CodeFragmentsAreThePackagesCodes) {
  std::mt19937 rng(3);
  const int64_t rows = 5, cols = 256;
  for (int bits : {2, 3, 4, 8}) {
    const quant::QuantFormat format{bits, 64, false, quant::ScaleType::F16};
    std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
    for (uint8_t &byte : packed)
      byte = static_cast<uint8_t>(rng());
    const quant::GroupPlanes planes = quant::groupPlanes(format, rows, cols);
    std::vector<uint8_t> planar(planes.totalBytes);
    quant::splitIntoPlanes(format, rows, cols, packed.data(), planar.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t block = 0; block < cols / 32; ++block)
        for (int t = 0; t < 4; ++t) {
          unsigned b[2];
          const uint8_t *at = planar.data() + r * planes.codeRowBytes + block * 4 * bits;
          switch (bits) {
          case 2:
            tensor::codeFragment<2>(at, t, b);
            break;
          case 3:
            tensor::codeFragment<3>(at, t, b);
            break;
          case 4:
            tensor::codeFragment<4>(at, t, b);
            break;
          default:
            tensor::codeFragment<8>(at, t, b);
          }
          for (int reg = 0; reg < 2; ++reg)
            for (int byte = 0; byte < 4; ++byte) {
              const int64_t col = block * 32 + 16 * reg + 4 * t + byte, g = col / format.group;
              const uint8_t *groupCodes =
                  packed.data() + r * format.rowBytes(cols) + g * format.groupBytes() + format.headerBytes();
              EXPECT_EQ(static_cast<int>((b[reg] >> (8 * byte)) & 0xFF),
                        quant::unpackCode(groupCodes, bits, col % format.group))
                  << bits << " bits, row " << r << " column " << col;
            }
        }
  }
}

// Whole tiles against gemvRowsScalar: partial row and token tiles, groups
// of 32, 64 and 128 with a short last group, every width, both scale
// types, symmetric and asymmetric, and ggml's signed Q8_0.
TEST(TensorTiles, TilesMatchTheScalarKernelInEveryFormat) {
  std::mt19937 rng(17);
  const Shape shapes[] = {{37, 200, 70}, {8, 32, 16}};
  for (int bits : {2, 3, 4, 8})
    for (int group : {32, 64, 128})
      for (bool symmetric : {false, true}) {
        const quant::ScaleType scale =
            (bits + group / 32 + symmetric) % 2 ? quant::ScaleType::BF16 : quant::ScaleType::F16;
        for (const Shape &shape : shapes)
          expectTilesMatchTheScalarKernel(quant::QuantFormat{bits, group, symmetric, scale}, false, shape, rng);
        if (::testing::Test::HasFatalFailure())
          return;
      }
  for (const Shape &shape : shapes)
    expectTilesMatchTheScalarKernel(quant::QuantFormat{8, 32, true, quant::ScaleType::F16}, true, shape, rng);
}

// The job's tiles cover its rows and tokens once each, row tiles first.
TEST(TensorTiles, TilesCoverTheJobOnce) {
  for (const Shape &shape : {Shape{37, 0, 70}, Shape{16, 0, 64}, Shape{1, 0, 16}, Shape{130, 0, 129}}) {
    std::vector<int> covered(static_cast<size_t>(shape.rows * shape.tokens), 0);
    const int64_t tiles = tensor::tileCount(shape.rows, shape.tokens);
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const tensor::TileOrigin origin = tensor::tileOrigin(shape.rows, tile);
      if (tile > 0 && origin.row > 0)
        EXPECT_EQ(origin.token, tensor::tileOrigin(shape.rows, tile - 1).token) << "row tiles first";
      for (int64_t t = origin.token; t < std::min(shape.tokens, origin.token + tensor::kTokens); ++t)
        for (int64_t r = origin.row; r < std::min(shape.rows, origin.row + tensor::kRows); ++r)
          ++covered[t * shape.rows + r];
    }
    for (int count : covered)
      ASSERT_EQ(count, 1) << shape.rows << " rows, " << shape.tokens << " tokens";
  }
}
