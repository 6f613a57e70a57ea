//===- CudaEngineTest.cpp - The engine's products on a GPU vs the CPU -----===//
//
// Part of moec. Every weight layout the device runs (f32, bf16, moec's group
// formats at every width, group and scale type, ggml's signed Q8_0) against
// the CPU's scalar reference on odd shapes and token counts; a token's
// experts of mixed formats and widths against the CPU's arithmetic; and
// whole models: logits of the engine on the GPU against the engine on the
// CPU (prefill and decode) and held-out perplexity, on both fixtures and on
// every package in $MOEC_DEVICE_PACKAGES (bench/device-check.sh makes one
// per recipe of examples/). Without a GPU the device cases skip and the
// error a user sees is checked instead.
//
//===----------------------------------------------------------------------===//

#include "EngineComparison.h"
#include "GroupedVariant.h"
#include "cpu/QuantKernels.h"
#include "cuda/MatrixProducts.h"
#include "moe/Frontend/DType.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Runtime/Device.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Runtime/Model.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <sstream>
#include <vector>

using namespace moe;

namespace {

std::shared_ptr<cuda::Context> context() {
  static std::shared_ptr<cuda::Context> opened = [] {
    Expected<std::shared_ptr<cuda::Context>> made = cuda::Context::open();
    return made ? made.take() : std::shared_ptr<cuda::Context>();
  }();
  return opened;
}

#define REQUIRE_GPU()                                                                                                  \
  if (!context())                                                                                                      \
  GTEST_SKIP() << "no CUDA device"

std::string dataDir() {
  if (const char *dir = std::getenv("MOEC_TEST_DATA_DIR"))
    return dir;
  return MOEC_TEST_DATA_DIR;
}

/// A random [rows, cols] matrix in `format` (quantizeReference of normal
/// values) and its host bytes.
std::vector<uint8_t> randomGroupMatrix(const quant::QuantFormat &format, int64_t rows, int64_t cols,
                                       std::mt19937 &rng) {
  std::normal_distribution<float> normal;
  std::vector<float> values(static_cast<size_t>(rows * cols));
  for (float &v : values)
    v = 0.05f * normal(rng);
  std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
  quant::quantizeReference(format, values.data(), rows, cols, packed.data());
  return packed;
}

/// ggml's Q8_0 as a group view: signed codes, f16 scales.
std::vector<uint8_t> randomSignedMatrix(int64_t rows, int64_t cols, std::mt19937 &rng) {
  const quant::QuantFormat format{8, 32, true, quant::ScaleType::F16};
  std::vector<uint8_t> packed(format.matrixBytes(rows, cols));
  for (uint8_t &b : packed)
    b = static_cast<uint8_t>(rng());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < format.groupsPerRow(cols); ++g) {
      const uint16_t scale = floatToHalf(0.001f * static_cast<float>(1 + rng() % 7));
      std::memcpy(packed.data() + r * format.rowBytes(cols) + g * format.groupBytes(), &scale, 2);
    }
  return packed;
}

/// The CPU's y for one token: its activation rounded at the matrix's group
/// size by the scalar reference, then the scalar integer kernel.
std::vector<float> cpuGroupProduct(const quant::QuantMatrixView &view, const float *x) {
  quant::QuantizedActivation activation;
  quant::quantizeActivationScalar(x, view.cols, view.format.group, activation);
  std::vector<float> y(static_cast<size_t>(view.rows));
  quant::gemvRowsScalar(view, activation, 0, view.rows, y.data());
  return y;
}

/// sum |w x| over a row from the dequantised matrix: the scale of a row's
/// rounding error.
double rowMagnitude(const std::vector<float> &dequantized, int64_t cols, int64_t r, const float *x) {
  double total = 0;
  for (int64_t c = 0; c < cols; ++c)
    total += std::fabs(static_cast<double>(dequantized[r * cols + c]) * x[c]);
  return total;
}

/// y[tokens, W.rows] = x[tokens, W.cols] W^T on the device.
std::vector<float> multiplyOnDevice(const cuda::DeviceWeight &weight, const std::vector<float> &x, int64_t tokens) {
  std::vector<float> y(static_cast<size_t>(tokens * weight.rows));
  const std::pair<const cuda::DeviceWeight *, float *> product{&weight, y.data()};
  Status status = context()->multiply(x.data(), tokens, weight.cols, &product, 1);
  EXPECT_TRUE(status.ok()) << status.message();
  return y;
}

struct Shape {
  int64_t rows, cols, tokens;
};
// Group formats run 16 tokens or more on tensor cores (TensorTiles.h): 17
// and 70 tokens (two token tiles, the second partial) take that kernel.
const Shape kShapes[] = {{1, 32, 1}, {37, 200, 3}, {130, 96, 9}, {19, 4099, 17}, {64, 1024, 8}, {45, 544, 70}};

std::vector<float> randomActivations(int64_t count, std::mt19937 &rng) {
  std::normal_distribution<float> normal;
  std::vector<float> x(static_cast<size_t>(count));
  for (float &v : x)
    v = normal(rng);
  return x;
}

/// Puts the context's default kernels back when it goes out of scope (an
/// ASSERT returning early included).
struct DefaultKernelsAfter {
  ~DefaultKernelsAfter() {
    context()->setProductKernel(cuda::ProductKernel::Auto);
    context()->setTensorCores(true);
  }
};

/// Runs `body` under each kernel of one token's group products, the first
/// with tensor cores for products of many tokens, the second with dp4a,
/// then puts the defaults back.
template <typename Body> void forEachProductKernel(Body body) {
  DefaultKernelsAfter restore;
  for (cuda::ProductKernel kernel : {cuda::ProductKernel::WarpPerRow, cuda::ProductKernel::Streamed}) {
    const bool tensor = kernel == cuda::ProductKernel::WarpPerRow;
    SCOPED_TRACE(tensor ? "warp-per-row kernel, tensor cores" : "streamed kernel, dp4a for many tokens");
    context()->setProductKernel(kernel);
    context()->setTensorCores(tensor);
    body();
  }
}

void expectGroupFormatMatches(const quant::QuantFormat &format, bool signedCodes, uint32_t seed) {
  std::mt19937 rng(seed);
  // Each shape over its tokens and over one token (the kernel of decode).
  std::vector<Shape> shapes;
  for (const Shape &shape : kShapes) {
    shapes.push_back(shape);
    shapes.push_back({shape.rows, shape.cols, 1});
  }
  for (const Shape &shape : shapes) {
    const std::vector<uint8_t> packed = signedCodes ? randomSignedMatrix(shape.rows, shape.cols, rng)
                                                    : randomGroupMatrix(format, shape.rows, shape.cols, rng);
    const quant::QuantMatrixView view{format, packed.data(), shape.rows, shape.cols, signedCodes};
    Expected<std::shared_ptr<const cuda::DeviceWeight>> weight = context()->upload(
        cuda::WeightLayout::Group, format, signedCodes, shape.rows, shape.cols, packed.data(), packed.size());
    ASSERT_TRUE(weight) << weight.status().message();
    const std::vector<float> x = randomActivations(shape.tokens * shape.cols, rng);
    const std::vector<float> y = multiplyOnDevice(**weight, x, shape.tokens);
    ASSERT_FALSE(::testing::Test::HasFailure());
    std::vector<float> dequantized(static_cast<size_t>(shape.rows * shape.cols));
    quant::dequantizeRows(view, 0, shape.rows, dequantized.data());
    for (int64_t t = 0; t < shape.tokens; ++t) {
      const std::vector<float> expected = cpuGroupProduct(view, x.data() + t * shape.cols);
      for (int64_t r = 0; r < shape.rows; ++r)
        ASSERT_NEAR(y[t * shape.rows + r], expected[r],
                    1e-5 * rowMagnitude(dequantized, shape.cols, r, x.data() + t * shape.cols) + 1e-6)
            << format.name() << (signedCodes ? " signed" : "") << " " << shape.rows << "x" << shape.cols << " token "
            << t << " row " << r;
    }
  }
}

} // namespace

TEST(CudaMatrixProducts, EveryGroupFormatMatchesTheCpuKernel) {
  REQUIRE_GPU();
  forEachProductKernel([] {
    uint32_t seed = 1;
    for (int bits : {2, 3, 4, 8})
      for (int group : {32, 64, 128})
        for (bool symmetric : {false, true})
          for (quant::ScaleType scale : {quant::ScaleType::F16, quant::ScaleType::BF16})
            expectGroupFormatMatches(quant::QuantFormat{bits, group, symmetric, scale}, false, seed++);
  });
}

// One token's kernels give the same bits: the same blocks per lane, in the
// same order, with the same arithmetic. Many rows (more than one wave of
// warps) of mixed formats in one launch, rows of several chunks of 32
// blocks (a lane adds up several blocks) and a short last group; then rows
// of 64, 48 and 104 blocks (whole chunks of 32 and of 64, and partial ones:
// the streamed kernel's kLaneBlocks at 1 and 2), over every bit width,
// symmetric and not, both scale types and ggml's signed Q8_0.
TEST(CudaMatrixProducts, OneTokenKernelsAgreeBitForBit) {
  REQUIRE_GPU();
  std::mt19937 rng(99);
  struct Kind {
    quant::QuantFormat format;
    bool signedCodes;
    int64_t rows;
  };
  using quant::ScaleType;
  const std::vector<Kind> first = {{{4, 128, false, ScaleType::F16}, false, 4000},
                                   {{3, 64, true, ScaleType::BF16}, false, 333},
                                   {{2, 32, false, ScaleType::F16}, false, 1200},
                                   {{8, 128, true, ScaleType::F16}, false, 17}};
  const std::vector<Kind> more = {
      {{4, 128, false, ScaleType::F16}, false, 300}, {{4, 32, true, ScaleType::BF16}, false, 150},
      {{2, 64, true, ScaleType::F16}, false, 90},    {{3, 128, false, ScaleType::BF16}, false, 40},
      {{8, 64, false, ScaleType::BF16}, false, 30},  {{8, 32, true, ScaleType::F16}, true, 70}};
  struct Made {
    std::shared_ptr<const cuda::DeviceWeight> weight;
    std::vector<float> y;
  };
  for (const int64_t cols : {int64_t{4099}, int64_t{2048}, int64_t{1536}, int64_t{3328}}) {
    SCOPED_TRACE(std::to_string(cols) + " columns");
    std::vector<Made> made;
    for (const Kind &kind : cols == 4099 ? first : more) {
      const std::vector<uint8_t> packed = kind.signedCodes ? randomSignedMatrix(kind.rows, cols, rng)
                                                           : randomGroupMatrix(kind.format, kind.rows, cols, rng);
      Expected<std::shared_ptr<const cuda::DeviceWeight>> weight = context()->upload(
          cuda::WeightLayout::Group, kind.format, kind.signedCodes, kind.rows, cols, packed.data(), packed.size());
      ASSERT_TRUE(weight) << weight.status().message();
      made.push_back({weight.take(), std::vector<float>(static_cast<size_t>(kind.rows))});
    }
    const std::vector<float> x = randomActivations(cols, rng);
    std::vector<std::vector<float>> results;
    forEachProductKernel([&] {
      std::vector<std::pair<const cuda::DeviceWeight *, float *>> products;
      for (Made &m : made)
        products.emplace_back(m.weight.get(), m.y.data());
      Status status = context()->multiply(x.data(), 1, cols, products.data(), products.size());
      ASSERT_TRUE(status.ok()) << status.message();
      std::vector<float> all;
      for (const Made &m : made)
        all.insert(all.end(), m.y.begin(), m.y.end());
      results.push_back(std::move(all));
    });
    ASSERT_EQ(results.size(), 2u);
    ASSERT_EQ(results[0].size(), results[1].size());
    size_t differing = 0;
    for (size_t i = 0; i < results[0].size(); ++i)
      differing += std::memcmp(&results[0][i], &results[1][i], sizeof(float)) != 0;
    EXPECT_EQ(differing, 0u);
  }
}

TEST(CudaMatrixProducts, SignedCodesMatchTheCpuKernel) {
  REQUIRE_GPU();
  forEachProductKernel([] {
    expectGroupFormatMatches(quant::QuantFormat{8, 32, true, quant::ScaleType::F16}, true, 99);
  });
}

TEST(CudaMatrixProducts, FloatMatricesMatchDoubleProducts) {
  REQUIRE_GPU();
  std::mt19937 rng(5);
  for (bool bf16 : {false, true})
    for (const Shape &shape : kShapes) {
      std::vector<float> values = randomActivations(shape.rows * shape.cols, rng);
      std::vector<uint16_t> bits(values.size());
      for (size_t i = 0; i < values.size(); ++i) {
        bits[i] = floatToBfloat16(values[i]);
        if (bf16)
          values[i] = bfloat16ToFloat(bits[i]);
      }
      Expected<std::shared_ptr<const cuda::DeviceWeight>> weight =
          bf16 ? context()->upload(cuda::WeightLayout::BF16, {}, false, shape.rows, shape.cols, bits.data(),
                                   bits.size() * 2)
               : context()->upload(cuda::WeightLayout::F32, {}, false, shape.rows, shape.cols, values.data(),
                                   values.size() * 4);
      ASSERT_TRUE(weight) << weight.status().message();
      const std::vector<float> x = randomActivations(shape.tokens * shape.cols, rng);
      const std::vector<float> y = multiplyOnDevice(**weight, x, shape.tokens);
      ASSERT_FALSE(::testing::Test::HasFailure());
      for (int64_t t = 0; t < shape.tokens; ++t)
        for (int64_t r = 0; r < shape.rows; ++r) {
          double expected = 0, magnitude = 0;
          for (int64_t c = 0; c < shape.cols; ++c) {
            const double term = static_cast<double>(values[r * shape.cols + c]) * x[t * shape.cols + c];
            expected += term;
            magnitude += std::fabs(term);
          }
          ASSERT_NEAR(y[t * shape.rows + r], expected, 1e-5 * magnitude + 1e-6)
              << (bf16 ? "bf16 " : "f32 ") << shape.rows << "x" << shape.cols << " token " << t << " row " << r;
        }
    }
}

TEST(CudaMatrixProducts, SeveralMatricesOnOneInput) {
  REQUIRE_GPU();
  std::mt19937 rng(11);
  const int64_t cols = 160;
  const quant::QuantFormat q4{4, 32, false, quant::ScaleType::F16}, q8{8, 128, true, quant::ScaleType::BF16};
  const std::vector<uint8_t> a = randomGroupMatrix(q4, 48, cols, rng), b = randomGroupMatrix(q8, 17, cols, rng);
  auto wa = context()->upload(cuda::WeightLayout::Group, q4, false, 48, cols, a.data(), a.size());
  auto wb = context()->upload(cuda::WeightLayout::Group, q8, false, 17, cols, b.data(), b.size());
  ASSERT_TRUE(wa && wb);
  const std::vector<float> x = randomActivations(cols, rng);
  std::vector<float> ya(48), yb(17);
  const std::pair<const cuda::DeviceWeight *, float *> products[] = {{wa->get(), ya.data()}, {wb->get(), yb.data()}};
  ASSERT_TRUE(context()->multiply(x.data(), 1, cols, products, 2).ok());
  const std::vector<float> ea = cpuGroupProduct({q4, a.data(), 48, cols}, x.data());
  const std::vector<float> eb = cpuGroupProduct({q8, b.data(), 17, cols}, x.data());
  for (int64_t r = 0; r < 48; ++r)
    EXPECT_NEAR(ya[r], ea[r], 1e-4 * (1 + std::fabs(ea[r])));
  for (int64_t r = 0; r < 17; ++r)
    EXPECT_NEAR(yb[r], eb[r], 1e-4 * (1 + std::fabs(eb[r])));
}

TEST(CudaMatrixProducts, ExpertsOfMixedFormatsAndWidthsMatchTheCpu) {
  REQUIRE_GPU();
  std::mt19937 rng(21);
  const int64_t H = 160;
  struct Spec {
    std::optional<quant::QuantFormat> format; // nullopt: bf16
    int64_t width;
    float weight;
  };
  const Spec specs[] = {{quant::QuantFormat{4, 128, false, quant::ScaleType::F16}, 96, 0.6f},
                        {quant::QuantFormat{2, 32, true, quant::ScaleType::BF16}, 64, 0.3f},
                        {std::nullopt, 80, 0.1f},
                        {quant::QuantFormat{3, 64, false, quant::ScaleType::F16}, 128, 1.0f}};
  std::vector<std::shared_ptr<const cuda::DeviceWeight>> held;
  std::map<const cuda::DeviceWeight *, std::vector<uint8_t>> packedOf;
  std::vector<cuda::ExpertProduct> experts;
  const std::vector<float> x = randomActivations(H, rng);
  std::vector<double> expected(H, 0.0), magnitude(H, 0.0);
  for (const Spec &spec : specs) {
    // Host copies, the device's, and the CPU's result of this expert.
    auto make = [&](int64_t rows, int64_t cols,
                    std::vector<float> &dense) -> std::shared_ptr<const cuda::DeviceWeight> {
      dense.assign(static_cast<size_t>(rows * cols), 0);
      if (spec.format) {
        std::vector<uint8_t> packed = randomGroupMatrix(*spec.format, rows, cols, rng);
        quant::dequantizeReference(*spec.format, packed.data(), rows, cols, dense.data());
        auto w =
            context()->upload(cuda::WeightLayout::Group, *spec.format, false, rows, cols, packed.data(), packed.size());
        EXPECT_TRUE(w) << w.status().message();
        // Keep the packed bytes for the CPU's integer product.
        packedOf[w->get()] = std::move(packed);
        return w.take();
      }
      std::vector<uint16_t> bits(dense.size());
      std::normal_distribution<float> normal;
      for (size_t i = 0; i < bits.size(); ++i) {
        bits[i] = floatToBfloat16(0.05f * normal(rng));
        dense[i] = bfloat16ToFloat(bits[i]);
      }
      auto w = context()->upload(cuda::WeightLayout::BF16, {}, false, rows, cols, bits.data(), bits.size() * 2);
      EXPECT_TRUE(w) << w.status().message();
      return w.take();
    };
    std::vector<float> gateDense, upDense, downDense;
    auto gate = make(spec.width, H, gateDense), up = make(spec.width, H, upDense),
         down = make(H, spec.width, downDense);
    held.insert(held.end(), {gate, up, down});
    experts.push_back({gate.get(), up.get(), down.get(), spec.weight});
    auto product = [&](const std::shared_ptr<const cuda::DeviceWeight> &w, const std::vector<float> &dense,
                       const float *input) {
      if (spec.format)
        return cpuGroupProduct({*spec.format, packedOf[w.get()].data(), w->rows, w->cols}, input);
      std::vector<float> y(static_cast<size_t>(w->rows));
      for (int64_t r = 0; r < w->rows; ++r) {
        float sum = 0;
        for (int64_t c = 0; c < w->cols; ++c)
          sum += dense[r * w->cols + c] * input[c];
        y[r] = sum;
      }
      return y;
    };
    const std::vector<float> g = product(gate, gateDense, x.data()), u = product(up, upDense, x.data());
    std::vector<float> h(static_cast<size_t>(spec.width));
    for (int64_t i = 0; i < spec.width; ++i)
      h[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    const std::vector<float> d = product(down, downDense, h.data());
    for (int64_t r = 0; r < H; ++r) {
      expected[r] += spec.weight * d[r];
      magnitude[r] += std::fabs(spec.weight * rowMagnitude(downDense, spec.width, r, h.data()));
    }
  }
  std::vector<float> out(H);
  Status status = context()->experts(x.data(), H, experts.data(), experts.size(), out.data());
  ASSERT_TRUE(status.ok()) << status.message();
  for (int64_t r = 0; r < H; ++r)
    EXPECT_NEAR(out[r], expected[r], 2e-3 * magnitude[r] + 1e-6) << "row " << r;
}

// A prefill's MoE block on the device: each expert gathers its tokens
// (in no particular order) from the block, and each token's weighted
// outputs are added back in expert order. Experts of 1, 5 and 20 tokens
// take the dp4a kernels (20: a bf16 expert), of 17 and 70 tokens the
// tensor cores; one expert has no token, and the last token is routed to
// none. The values against the CPU's arithmetic; the sums bit for bit
// against each expert's outputs alone (weight 1) added in the engine's
// order.
TEST(CudaMatrixProducts, RoutedExpertsOverABlockMatchTheCpu) {
  REQUIRE_GPU();
  std::mt19937 rng(31);
  const int64_t H = 96, T = 80;
  struct Spec {
    std::optional<quant::QuantFormat> format; // nullopt: bf16
    int64_t width, count;
  };
  const Spec specs[] = {{quant::QuantFormat{4, 32, false, quant::ScaleType::F16}, 64, 1},
                        {quant::QuantFormat{8, 64, true, quant::ScaleType::BF16}, 40, 70},
                        {quant::QuantFormat{2, 32, true, quant::ScaleType::F16}, 32, 0},
                        {quant::QuantFormat{3, 32, true, quant::ScaleType::F16}, 128, 17},
                        {std::nullopt, 56, 20},
                        {quant::QuantFormat{2, 32, false, quant::ScaleType::BF16}, 48, 5}};
  const int experts = 6;
  std::vector<std::shared_ptr<const cuda::DeviceWeight>> held;
  std::vector<std::vector<uint8_t>> packed; // each matrix's bytes (group formats)
  std::vector<std::vector<float>> dense;    // and its values as the device sees them
  std::vector<std::vector<int32_t>> tokensOf(experts);
  std::vector<std::vector<float>> weightsOf(experts);
  std::vector<cuda::RoutedExpertTokens> routed;
  std::vector<int32_t> order(static_cast<size_t>(T - 1));
  std::iota(order.begin(), order.end(), 0);
  for (int i = 0; i < experts; ++i) {
    const Spec &spec = specs[i];
    for (auto [rows, cols] : {std::pair{spec.width, H}, std::pair{spec.width, H}, std::pair{H, spec.width}}) {
      dense.emplace_back(static_cast<size_t>(rows * cols));
      Expected<std::shared_ptr<const cuda::DeviceWeight>> w = Status::error("unset");
      packed.emplace_back();
      if (spec.format) {
        packed.back() = randomGroupMatrix(*spec.format, rows, cols, rng);
        quant::dequantizeReference(*spec.format, packed.back().data(), rows, cols, dense.back().data());
        w = context()->upload(cuda::WeightLayout::Group, *spec.format, false, rows, cols, packed.back().data(),
                              packed.back().size());
      } else {
        std::vector<uint16_t> bits(dense.back().size());
        for (size_t j = 0; j < bits.size(); ++j) {
          bits[j] = floatToBfloat16(0.002f * static_cast<float>(static_cast<int>(rng() % 200) - 100));
          dense.back()[j] = bfloat16ToFloat(bits[j]);
        }
        w = context()->upload(cuda::WeightLayout::BF16, {}, false, rows, cols, bits.data(), bits.size() * 2);
      }
      ASSERT_TRUE(w) << w.status().message();
      held.push_back(w.take());
    }
    std::shuffle(order.begin(), order.end(), rng);
    tokensOf[i].assign(order.begin(), order.begin() + spec.count);
    for (int64_t r = 0; r < spec.count; ++r)
      weightsOf[i].push_back(0.1f + 0.9f * static_cast<float>(rng() % 1000) / 1000.0f);
    routed.push_back({held[3 * i].get(), held[3 * i + 1].get(), held[3 * i + 2].get(), tokensOf[i].data(),
                      weightsOf[i].data(), spec.count});
  }
  const std::vector<float> x = randomActivations(T * H, rng);
  std::vector<float> out(static_cast<size_t>(T * H), -1.0f);
  Status status = context()->routedExperts(x.data(), T, H, routed.data(), routed.size(), out.data());
  ASSERT_TRUE(status.ok()) << status.message();
  // Against the CPU: group experts through the scalar kernels, the bf16
  // expert in double; tolerances as the other expert tests'.
  std::vector<float> expected(static_cast<size_t>(T * H), 0.0f), tolerance(expected.size(), 1e-6f);
  for (int i = 0; i < experts; ++i) {
    const Spec &spec = specs[i];
    const int64_t I = spec.width;
    const std::vector<float> &down = dense[3 * i + 2];
    for (int64_t r = 0; r < spec.count; ++r) {
      const int64_t t = tokensOf[i][r];
      const float *xt = x.data() + t * H;
      std::vector<float> g(static_cast<size_t>(I)), u(g.size()), h(g.size()), y(static_cast<size_t>(H));
      // matrix m of this expert times `in`: the CPU's scalar kernel for
      // group formats, double sums for bf16.
      auto product = [&](int m, int64_t rows, int64_t cols, const float *in, float *result) {
        if (spec.format) {
          const std::vector<float> y = cpuGroupProduct({*spec.format, packed[3 * i + m].data(), rows, cols}, in);
          std::copy(y.begin(), y.end(), result);
          return;
        }
        const std::vector<float> &w = dense[3 * i + m];
        for (int64_t row = 0; row < rows; ++row) {
          double total = 0;
          for (int64_t c = 0; c < cols; ++c)
            total += static_cast<double>(w[row * cols + c]) * in[c];
          result[row] = static_cast<float>(total);
        }
      };
      product(0, I, H, xt, g.data());
      product(1, I, H, xt, u.data());
      for (int64_t j = 0; j < I; ++j)
        h[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
      product(2, H, I, h.data(), y.data());
      // As the other expert tests: 2e-3 of a row's magnitude for group
      // formats (an activation on an int8 rounding boundary), 1e-4 for bf16.
      const float relative = spec.format ? 2e-3f : 1e-4f;
      for (int64_t c = 0; c < H; ++c) {
        expected[t * H + c] += weightsOf[i][r] * y[c];
        tolerance[t * H + c] += weightsOf[i][r] * relative * static_cast<float>(rowMagnitude(down, I, c, h.data()));
      }
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < H; ++c)
      ASSERT_NEAR(out[t * H + c], expected[t * H + c], tolerance[t * H + c]) << "token " << t << " column " << c;
  for (int64_t c = 0; c < H; ++c)
    EXPECT_EQ(out[(T - 1) * H + c], 0.0f) << "a token routed to no expert";
  // The sums bit for bit: each expert alone with weights 1 gives its outputs
  // (0 + 1 * y = y), which the engine's order then adds.
  std::vector<float> sums(static_cast<size_t>(T * H), 0.0f);
  for (int i = 0; i < experts; ++i) {
    if (specs[i].count == 0)
      continue;
    const std::vector<float> ones(static_cast<size_t>(specs[i].count), 1.0f);
    cuda::RoutedExpertTokens alone = routed[i];
    alone.weights = ones.data();
    std::vector<float> y(static_cast<size_t>(T * H));
    status = context()->routedExperts(x.data(), T, H, &alone, 1, y.data());
    ASSERT_TRUE(status.ok()) << status.message();
    for (int64_t r = 0; r < specs[i].count; ++r) {
      const int64_t t = tokensOf[i][r];
      for (int64_t c = 0; c < H; ++c)
        sums[t * H + c] = sums[t * H + c] + weightsOf[i][r] * y[t * H + c];
    }
  }
  size_t differing = 0;
  for (size_t j = 0; j < sums.size(); ++j)
    differing += std::memcmp(&sums[j], &out[j], sizeof(float)) != 0;
  EXPECT_EQ(differing, 0u) << "weighted sums not in the engine's order";
  // A token outside the block is refused, by name.
  const int32_t outside = static_cast<int32_t>(T);
  const float weight = 1.0f;
  cuda::RoutedExpertTokens stray = routed[0];
  stray.tokens = &outside;
  stray.weights = &weight;
  stray.count = 1;
  status = context()->routedExperts(x.data(), T, H, &stray, 1, out.data());
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("token 80 of a block of 80"), std::string::npos) << status.message();
}

// One launch's table mixes tensor jobs (group formats over 16 tokens or
// more) with jobs a warp per row takes (bf16): each kernel finds its own
// jobs. Tensor cores and dp4a give the same values but for float order.
TEST(CudaMatrixProducts, TensorCoreAndDp4aProductsAgreeInOneLaunch) {
  REQUIRE_GPU();
  if (context()->facts().computeCapability < 80)
    GTEST_SKIP() << "tensor-core products need sm_80";
  ASSERT_TRUE(context()->tensorCores());
  std::mt19937 rng(41);
  const int64_t cols = 288, tokens = 40;
  // Matrices in launch order; no format: bf16.
  const std::pair<std::optional<quant::QuantFormat>, int64_t> matrices[] = {
      {quant::QuantFormat{4, 128, false, quant::ScaleType::F16}, 200},
      {std::nullopt, 33},
      {quant::QuantFormat{2, 32, true, quant::ScaleType::BF16}, 17},
      {quant::QuantFormat{8, 64, false, quant::ScaleType::F16}, 50}};
  std::vector<std::shared_ptr<const cuda::DeviceWeight>> held;
  std::vector<std::vector<float>> dequantized;
  for (const auto &[format, rows] : matrices) {
    dequantized.emplace_back(static_cast<size_t>(rows * cols));
    Expected<std::shared_ptr<const cuda::DeviceWeight>> w = Status::error("unset");
    if (format) {
      const std::vector<uint8_t> packed = randomGroupMatrix(*format, rows, cols, rng);
      quant::dequantizeReference(*format, packed.data(), rows, cols, dequantized.back().data());
      w = context()->upload(cuda::WeightLayout::Group, *format, false, rows, cols, packed.data(), packed.size());
    } else {
      std::vector<uint16_t> bits(static_cast<size_t>(rows * cols));
      for (size_t i = 0; i < bits.size(); ++i) {
        bits[i] = floatToBfloat16(0.001f * static_cast<float>(static_cast<int>(rng() % 200) - 100));
        dequantized.back()[i] = bfloat16ToFloat(bits[i]);
      }
      w = context()->upload(cuda::WeightLayout::BF16, {}, false, rows, cols, bits.data(), bits.size() * 2);
    }
    ASSERT_TRUE(w) << w.status().message();
    held.push_back(w.take());
  }
  const std::vector<float> x = randomActivations(tokens * cols, rng);
  std::vector<std::vector<float>> results[2];
  DefaultKernelsAfter restore;
  for (int run = 0; run < 2; ++run) {
    context()->setTensorCores(run == 0);
    std::vector<std::pair<const cuda::DeviceWeight *, float *>> products;
    results[run].resize(held.size());
    for (size_t i = 0; i < held.size(); ++i) {
      results[run][i].assign(static_cast<size_t>(tokens * held[i]->rows), -1.0f);
      products.emplace_back(held[i].get(), results[run][i].data());
    }
    Status status = context()->multiply(x.data(), tokens, cols, products.data(), products.size());
    ASSERT_TRUE(status.ok()) << status.message();
  }
  for (size_t i = 0; i < held.size(); ++i)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t r = 0; r < held[i]->rows; ++r)
        ASSERT_NEAR(results[0][i][t * held[i]->rows + r], results[1][i][t * held[i]->rows + r],
                    1e-5 * rowMagnitude(dequantized[i], cols, r, x.data() + t * cols) + 1e-6)
            << "matrix " << i << " token " << t << " row " << r;
}

TEST(CudaMatrixProducts, UploadChecksShapesAndBytes) {
  REQUIRE_GPU();
  std::vector<uint8_t> bytes(100);
  EXPECT_FALSE(context()->upload(cuda::WeightLayout::F32, {}, false, 5, 5, bytes.data(), 99));
  EXPECT_FALSE(context()->upload(cuda::WeightLayout::F32, {}, false, 0, 5, bytes.data(), 0));
  EXPECT_FALSE(context()->upload(cuda::WeightLayout::Group, quant::QuantFormat{5, 32, false, quant::ScaleType::F16},
                                 false, 1, 32, bytes.data(), 20));
  EXPECT_FALSE(context()->upload(cuda::WeightLayout::Group, quant::QuantFormat{4, 32, true, quant::ScaleType::F16},
                                 true, 1, 32, bytes.data(), 18));
  auto w = context()->upload(cuda::WeightLayout::F32, {}, false, 5, 5, bytes.data(), 100);
  ASSERT_TRUE(w);
  std::vector<float> x(4), y(5);
  const std::pair<const cuda::DeviceWeight *, float *> product{w->get(), y.data()};
  Status status = context()->multiply(x.data(), 1, 4, &product, 1);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("columns"), std::string::npos) << status.message();
}

TEST(CudaMatrixProducts, ADecodeStepBegunBeforeTheLastEndedIsRefused) {
  REQUIRE_GPU();
  // A layer whose MLP stays on the device leaves its new key and value rows
  // for the step's last wait (decodeEnd). A step begun before that wait
  // (or decodeDiscard) would drop them from the host cache: an error, and
  // after decodeDiscard a step begins again.
  Expected<std::shared_ptr<cuda::Context>> made = cuda::Context::open();
  ASSERT_TRUE(made) << made.status().message();
  cuda::Context &c = **made;
  const int64_t H = 64;
  std::mt19937 rng(5);
  std::vector<std::vector<float>> matrices;
  std::vector<std::shared_ptr<const cuda::DeviceWeight>> held;
  for (int i = 0; i < 4; ++i) {
    matrices.push_back(randomActivations(H * H, rng));
    auto w = c.upload(cuda::WeightLayout::F32, {}, false, H, H, matrices.back().data(), H * H * 4);
    ASSERT_TRUE(w) << w.status().message();
    held.push_back(*w);
  }
  const std::vector<float> ones(H, 1.0f);
  auto norm = c.uploadVector(ones.data(), H);
  ASSERT_TRUE(norm) << norm.status().message();
  cuda::DecodeAttention a;
  a.attentionNorm = a.mlpNorm = static_cast<const float *>((*norm)->data);
  a.eps = 1e-5f;
  a.query = held[0].get();
  a.key = held[1].get();
  a.value = held[2].get();
  a.output = held[3].get();
  a.heads = a.kvHeads = 2;
  a.headDim = a.valueDim = 32;
  a.softmaxScale = 0.125f;
  std::shared_ptr<cuda::KvMirror> mirror = c.newKvMirror(1);
  ASSERT_TRUE(c.decodeSyncCache(*mirror, 0, nullptr, nullptr, 0, H, H).ok());
  const std::vector<float> x = randomActivations(H, rng);
  std::vector<float> keyRow(H), valueRow(H);
  ASSERT_TRUE(c.decodeBegin(x.data(), H).ok());
  Status status = c.decodeAttention(a, *mirror, 0, 0, nullptr, keyRow.data(), valueRow.data());
  ASSERT_TRUE(status.ok()) << status.message();
  status = c.decodeBegin(x.data(), H);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("a step began before the last one ended or was discarded"), std::string::npos)
      << status.message();
  c.decodeDiscard();
  EXPECT_TRUE(c.decodeBegin(x.data(), H).ok());
  c.decodeDiscard();
}

TEST(CudaDevice, WithoutAGpuTheErrorSaysSo) {
  if (context())
    GTEST_SKIP() << "a CUDA device is present";
  Expected<std::shared_ptr<Device>> device = openDevice(DeviceChoice::Cuda);
  ASSERT_FALSE(device);
  EXPECT_NE(device.status().message().find("--device cuda: no CUDA device is usable"), std::string::npos)
      << device.status().message();
  Expected<std::shared_ptr<Device>> automatic = openDevice(DeviceChoice::Auto);
  ASSERT_TRUE(automatic) << automatic.status().message();
  EXPECT_EQ(automatic->get(), nullptr);
}

// bench/cuda_engine --product-kernel: a name the device does not know is
// refused with the names it does.
namespace {

/// A choice refused, with a message that names `text` (what is known).
void expectRefused(const Status &status, const std::string &text) {
  ASSERT_FALSE(status.ok()) << "a refusal naming " << text;
  EXPECT_NE(status.message().find(text), std::string::npos) << status.message();
}

} // namespace

TEST(CudaDevice, AnUnknownProductKernelIsNamed) {
  REQUIRE_GPU();
  Expected<std::shared_ptr<Device>> device = openDevice(DeviceChoice::Cuda);
  ASSERT_TRUE(device) << device.status().message();
  expectRefused((*device)->chooseProductKernel("fastest"), "'fastest' (auto, streamed, warp-per-row or dp4a)");
  EXPECT_TRUE((*device)->chooseProductKernel("dp4a").ok());
  EXPECT_TRUE((*device)->chooseProductKernel("auto").ok());
}

namespace {

/// Whether these tests run on the CPU emulation of CUDA
/// (moec-cuda-emulated-tests: kernels/cuda compiled as C++, every kernel
/// run lane by lane, some thousand times slower than the CPU engine).
/// There the fixtures' held-out perplexity is taken over fewer tokens.
#if MOEC_CUDA_EMULATION
constexpr bool kEmulated = true;
#else
constexpr bool kEmulated = false;
#endif

/// Whether $MOEC_PARITY_QUICK asks for the short runs (the fixtures alone,
/// fewer tokens): what compute-sanitizer's slower tools get through.
bool quickParity() {
  const char *quick = std::getenv("MOEC_PARITY_QUICK");
  return quick && *quick && std::string(quick) != "0";
}

/// The packages in $MOEC_DEVICE_PACKAGES, sorted.
std::vector<std::string> devicePackages() {
  std::vector<std::string> packages;
  if (const char *dir = std::getenv("MOEC_DEVICE_PACKAGES"))
    for (const auto &entry : std::filesystem::directory_iterator(dir))
      if (entry.path().extension() == ".moepkg")
        packages.push_back(entry.path().string());
  std::sort(packages.begin(), packages.end());
  return packages;
}

/// The models whole-engine parity runs on: both fixtures, the packages in
/// $MOEC_DEVICE_PACKAGES, and (families' features: biases, qk-norm of both
/// kinds, LayerNorm, gated shared experts, partial and LongRoPE, clamping,
/// dense layers, MLA with and without a query low-rank projection) the
/// tiny checkpoints transformers saved for every family. With
/// $MOEC_PARITY_PACKAGES set, the packages alone (the emulated suite's run
/// over packages of group formats, which the fixtures and families lack).
std::vector<std::string> parityModels() {
  if (const char *only = std::getenv("MOEC_PARITY_PACKAGES"); only && *only && std::string(only) != "0") {
    std::vector<std::string> packages = devicePackages();
    if (packages.empty())
      ADD_FAILURE() << "$MOEC_PARITY_PACKAGES set, and no packages in $MOEC_DEVICE_PACKAGES";
    return packages;
  }
  std::vector<std::string> models = {dataDir() + "/fixtures/tiny-mixtral", dataDir() + "/fixtures/tiny-deepseek"};
  if (quickParity())
    return models;
  std::vector<std::string> families;
  for (const auto &entry : std::filesystem::directory_iterator(dataDir() + "/hf"))
    if (entry.is_directory())
      families.push_back(entry.path().string());
  std::sort(families.begin(), families.end());
  models.insert(models.end(), families.begin(), families.end());
  const std::vector<std::string> packages = devicePackages();
  models.insert(models.end(), packages.begin(), packages.end());
  return models;
}

using moe::testing::maxCacheDifference;
using moe::testing::maxDifference;

/// A directory removed with everything in it when the scope ends.
struct TemporaryDirectory {
  std::filesystem::path path;
  explicit TemporaryDirectory(const std::string &name)
      : path(std::filesystem::temp_directory_path() / (name + "-" + std::to_string(::getpid()))) {}
  ~TemporaryDirectory() {
    std::error_code ignored;
    std::filesystem::remove_all(path, ignored);
  }
};

} // namespace

TEST(CudaEngine, LogitsAndPerplexityMatchTheCpuEngine) {
  REQUIRE_GPU();
  Expected<std::shared_ptr<Device>> device = openDevice(DeviceChoice::Cuda);
  ASSERT_TRUE(device) << device.status().message();
  std::printf("device: %s\n", (*device)->description().c_str());
  for (const std::string &path : parityModels()) {
    SCOPED_TRACE(path);
    Expected<LoadedModel> cpu = loadModel(path);
    ASSERT_TRUE(cpu) << cpu.status().message();
    EngineOptions options;
    options.device = *device;
    Expected<LoadedModel> gpu = loadModel(path, options);
    ASSERT_TRUE(gpu) << gpu.status().message();
    // Held-out text where the model has a tokenizer; else fixed ids.
    Expected<std::vector<EvalStream>> streams = std::vector<EvalStream>();
    if (cpu->tokenizer) {
      streams = readEvalData(dataDir() + "/brown/heldout.jsonl", cpu->tokenizer.get(), cpu->endOfText);
    } else {
      EvalStream stream;
      stream.domain = "ids";
      for (int64_t i = 0; i < 1024; ++i)
        stream.ids.push_back(static_cast<int32_t>((i * 7919 + 13) % cpu->spec.vocabSize));
      streams->push_back(std::move(stream));
    }
    ASSERT_TRUE(streams) << streams.status().message();
    const std::vector<int32_t> &ids = streams->front().ids;
    ASSERT_GE(ids.size(), 128u);
    // Prefill of 96 tokens, then 8 tokens decoded one at a time (less
    // where the model's context is shorter: phimoe_longrope has 64).
    const size_t context = static_cast<size_t>(std::min<int64_t>(cpu->spec.maxPositions, 104));
    KvCache cpuCache = cpu->engine->newCache(), gpuCache = gpu->engine->newCache();
    std::vector<float> cpuLogits, gpuLogits;
    const std::span<const int32_t> prompt(ids.data(), context - 8);
    ASSERT_TRUE(cpu->engine->forward(prompt, cpuCache, cpuLogits).ok());
    Status status = gpu->engine->forward(prompt, gpuCache, gpuLogits);
    ASSERT_TRUE(status.ok()) << status.message();
    const double prefill = maxDifference(cpuLogits, gpuLogits);
    double decode = 0, decodeKl = 0;
    for (size_t t = context - 8; t < context; ++t) {
      const std::span<const int32_t> token(ids.data() + t, 1);
      ASSERT_TRUE(cpu->engine->forward(token, cpuCache, cpuLogits).ok());
      status = gpu->engine->forward(token, gpuCache, gpuLogits);
      ASSERT_TRUE(status.ok()) << status.message();
      decode = std::max(decode, maxDifference(cpuLogits, gpuLogits));
      decodeKl += moe::testing::klDivergence(cpuLogits, gpuLogits) / 8;
    }
    // The host cache holds the decoded tokens' keys and values too (copied
    // back at each token's one wait when the MLP stayed on the device).
    ASSERT_EQ(gpuCache.length, cpuCache.length);
    const double cacheDifference = maxCacheDifference(cpuCache, gpuCache);
    EvalOptions evalOptions;
    evalOptions.sequenceLength = std::min<int64_t>(cpu->spec.maxPositions, 128);
    evalOptions.maxTokens = kEmulated && cpu->spec.vocabSize > 1024 ? 128 : 1024;
    evalOptions.progressLabel = "";
    Expected<EvalResult> cpuScore = evaluate(*cpu->engine, *streams, evalOptions);
    evalOptions.reference = cpu->engine.get();
    Expected<EvalResult> gpuScore = evaluate(*gpu->engine, *streams, evalOptions);
    ASSERT_TRUE(cpuScore && gpuScore) << (gpuScore ? cpuScore.status().message() : gpuScore.status().message());
    const double cpuPpl = cpuScore->overall.perplexity(), gpuPpl = gpuScore->overall.perplexity();
    const EvalComparison &comparison = *gpuScore->comparison;
    std::printf("parity %s: max |logit difference| prefill %.3g decode %.3g; perplexity cpu %.6f cuda %.6f (%+.4f%%); "
                "KL mean %.3g max %.3g, top-1 agreement %.4f; %zu bytes on the device\n",
                std::filesystem::path(path).filename().c_str(), prefill, decode, cpuPpl, gpuPpl,
                100.0 * (gpuPpl / cpuPpl - 1), comparison.klMean, comparison.klMax, comparison.top1Agreement,
                (*device)->residentBytes());
    // Float models: the same products up to float order. Quantized ones
    // round each activation to int8 from values that already differ in the
    // last bits, so a value at a rounding boundary moves by one step; the
    // distributions must still agree.
    std::printf("parity %s: max |key or value difference| in the host cache %.3g; decoded tokens' KL mean %.3g\n",
                std::filesystem::path(path).filename().c_str(), cacheDifference, decodeKl);
    if (path.find(".moepkg") == std::string::npos) {
      EXPECT_LE(prefill, 1e-3);
      EXPECT_LE(decode, 1e-3);
      EXPECT_LE(cacheDifference, 1e-3);
    } else {
      EXPECT_TRUE(std::isfinite(cacheDifference)) << "the cache rows are all there";
    }
    // Perplexity takes the prompt path; decode (the residual stream on the
    // device, where quantized products round their inputs in the kernels
    // that write them) is held to the same distribution bound here.
    EXPECT_LE(decodeKl, 1e-3);
    EXPECT_LE(comparison.klMean, 1e-3);
    EXPECT_GE(comparison.top1Agreement, 0.98);
    EXPECT_NEAR(gpuPpl / cpuPpl, 1.0, 1e-3);
  }
}

TEST(CudaEngine, RoutingOnTheDeviceMatchesRoutingOnTheHost) {
  REQUIRE_GPU();
  // The same decode with the MoE layers routed on the device (one wait a
  // token; each layer's launches replayed as a graph, then launched one by
  // one) and on the host (a wait a layer): graphs and launches give the
  // same bits; device and host routing the same experts, so logits within
  // float order of each other, and the same expert calls counted.
  for (const std::string &path : parityModels()) {
    SCOPED_TRACE(path);
    auto [device, model] = moe::testing::loadOnCuda(path);
    ASSERT_TRUE(model) << model.status().message();
    Engine &engine = *model->engine;
    // The fixtures decode past 256 positions, where the device's KV mirror
    // grows in the middle of a token (a wait with rows still on their way).
    const bool fixture = path.find("/fixtures/") != std::string::npos;
    const int64_t tokens = std::min<int64_t>(model->spec.maxPositions - 4, quickParity() ? 24 : fixture ? 300 : 40);
    // The fourth run routes on the device with kernels that wait for the
    // one before them to end (the others overlap them where the device can:
    // on a GPU of sm_90 or later; the emulation runs kernels one at a time,
    // and checks that each awaits the one before). The fifth runs each MoE
    // block's SwiGLU and weighted sum as launches of their own (the others
    // inside the products, whichever one-token kernel auto picks); the
    // sixth inside the products, a warp per row (the two kernels agree bit
    // for bit: CudaMatrixProducts.OneTokenKernelsAgreeBitForBit).
    std::vector<std::vector<float>> logits[6];
    RoutingCounters counters[6];
    const char *routings[] = {"host", "device", "device-eager", "device", "device", "device"};
    for (int run = 0; run < 6; ++run) {
      ASSERT_TRUE((*device)->chooseRouting(routings[run]).ok());
      ASSERT_TRUE((*device)->chooseLaunches(run == 3 ? "plain" : "dependent").ok());
      ASSERT_TRUE((*device)->chooseMoeKernels(run == 4 ? "apart" : "fused").ok());
      ASSERT_TRUE((*device)->chooseProductKernel(run == 5 ? "warp-per-row" : "auto").ok());
      engine.resetRoutingCounters();
      KvCache cache = engine.newCache();
      std::vector<float> out;
      // A short prefill (products on the device, routing on the host), then
      // one token at a time.
      std::vector<int32_t> prompt;
      for (int64_t i = 0; i < 8; ++i)
        prompt.push_back(static_cast<int32_t>((i * 7919 + 13) % model->spec.vocabSize));
      ASSERT_TRUE(engine.forward(prompt, cache, out).ok());
      for (int64_t t = 8; t < tokens; ++t) {
        const int32_t id = static_cast<int32_t>((t * 7919 + 13) % model->spec.vocabSize);
        Status status = engine.forward(std::span<const int32_t>(&id, 1), cache, out);
        ASSERT_TRUE(status.ok()) << status.message();
        logits[run].push_back(out);
      }
      // Then a prefill again, on the host, over the cache rows the decoded
      // tokens left there (at each token's last wait when routed on the
      // device).
      const std::vector<int32_t> more = {5, 9, 2, 7};
      ASSERT_TRUE(engine.forward(more, cache, out).ok());
      logits[run].push_back(out);
      EXPECT_EQ(cache.length, tokens + 4);
      counters[run] = engine.routingCounters();
    }
    ASSERT_TRUE((*device)->chooseLaunches("dependent").ok());
    ASSERT_TRUE((*device)->chooseMoeKernels("fused").ok());
    ASSERT_TRUE((*device)->chooseProductKernel("auto").ok());
    double most = 0, graphs = 0, overlapped = 0, apart = 0, warpPerRow = 0;
    for (size_t t = 0; t < logits[0].size(); ++t) {
      most = std::max(most, maxDifference(logits[0][t], logits[1][t]));
      graphs = std::max(graphs, maxDifference(logits[1][t], logits[2][t]));
      overlapped = std::max(overlapped, maxDifference(logits[1][t], logits[3][t]));
      apart = std::max(apart, maxDifference(logits[1][t], logits[4][t]));
      warpPerRow = std::max(warpPerRow, maxDifference(logits[1][t], logits[5][t]));
    }
    EXPECT_EQ(graphs, 0.0) << "a graph replays the launches it captured";
    EXPECT_EQ(overlapped, 0.0) << "kernels that overlap the one before compute what they compute one after another";
    EXPECT_EQ(apart, 0.0) << "SwiGLU and the weighted sum compute the same inside the products as on their own";
    EXPECT_EQ(warpPerRow, 0.0) << "fused into either one-token kernel, the same bits";
    EXPECT_EQ(counters[1].expertCalls, counters[2].expertCalls);
    EXPECT_EQ(counters[1].expertCalls, counters[4].expertCalls);
    EXPECT_EQ(counters[1].expertCalls, counters[5].expertCalls);
    // The device run routed on the device: checkpoints' MoE layers are all
    // held whole (none has more rows or experts a token than the kernel
    // takes); a package's layers with experts split into parts route on
    // the host.
    const int64_t moeLayers = std::count_if(model->spec.layers.begin(), model->spec.layers.end(),
                                            [](const LayerSpec &l) { return l.mlp == MlpKind::Moe; });
    const int64_t routed = (*device)->routedLayers();
    EXPECT_LE(routed, moeLayers);
    // Graphs were captured and replayed (a failed one runs launch by launch
    // and would pass the comparisons above unseen).
    const DeviceGraphStats graphStats = (*device)->graphStats();
    EXPECT_EQ(graphStats.failures, 0) << graphStats.firstFailure;
    // A token's graph is child graphs of kernels launched as programmatic
    // dependent launches: where a GPU's CUDA refuses that, per-layer graphs
    // run (the same bits), and the run says so; the emulation accepts it.
    if (kEmulated)
      EXPECT_EQ(graphStats.tokenFailures, 0) << graphStats.firstFailure;
    else if (graphStats.tokenFailures > 0)
      std::printf("routing %s: a token's graph failed (%s); per-layer graphs ran\n",
                  std::filesystem::path(path).filename().c_str(), graphStats.firstFailure.c_str());
    if (path.find(".moepkg") == std::string::npos) {
      EXPECT_EQ(routed, moeLayers);
      EXPECT_GT(graphStats.captures, 0);
      EXPECT_GT(graphStats.replays, graphStats.captures);
      // The device runs' tokens ran as one graph each (the default), and
      // gave the launches' bits above.
      if (graphStats.tokenFailures == 0)
        EXPECT_GT(graphStats.tokenReplays, 0);
    }
    std::printf("routing %s: %lld of %lld MoE layers on the device; device vs host max |logit difference| %.3g over "
                "%zu tokens (graphs vs launches %.3g, fused vs apart %.3g, vs a warp per row %.3g; %lld captures, %lld "
                "replays, %lld tokens' "
                "graphs launched); "
                "expert calls %lld vs %lld\n",
                std::filesystem::path(path).filename().c_str(), static_cast<long long>(routed),
                static_cast<long long>(moeLayers), most, logits[0].size(), graphs, apart, warpPerRow,
                static_cast<long long>(graphStats.captures), static_cast<long long>(graphStats.replays),
                static_cast<long long>(graphStats.tokenReplays), static_cast<long long>(counters[1].expertCalls),
                static_cast<long long>(counters[0].expertCalls));
    EXPECT_EQ(counters[0].routedTokens, counters[1].routedTokens);
    if (path.find(".moepkg") == std::string::npos) {
      EXPECT_EQ(counters[0].expertCalls, counters[1].expertCalls);
      EXPECT_LE(most, 1e-3);
    } else {
      // int8 activations round on either side of a boundary (see the parity
      // test), and a weight within an ulp of a dynamic-skip threshold can
      // go either way: close, not equal.
      EXPECT_NEAR(static_cast<double>(counters[0].expertCalls), static_cast<double>(counters[1].expertCalls),
                  0.01 * static_cast<double>(counters[0].expertCalls) + 1);
      EXPECT_LE(most, 0.5);
    }
  }
}

TEST(CudaEngine, AttentionSplitOverBlocksMatchesABlockAHead) {
  REQUIRE_GPU();
  // Decode attention splits a head's positions over blocks (runs of 64 or
  // more, the last block of a head adding the runs): one block a head and
  // at most four (two to four runs from position 65 on, the last one
  // short), each against the CPU engine token by token. (The default, two
  // blocks a head on the emulation's four multiprocessors, is the parity
  // test's.)
  for (const std::string &fixture : {"tiny-mixtral", "tiny-deepseek"}) {
    const std::string path = dataDir() + "/fixtures/" + fixture;
    SCOPED_TRACE(path);
    Expected<LoadedModel> cpu = loadModel(path);
    ASSERT_TRUE(cpu) << cpu.status().message();
    auto [device, model] = moe::testing::loadOnCuda(path);
    ASSERT_TRUE(model) << model.status().message();
    const int64_t tokens = quickParity() ? 80 : 200;
    std::vector<std::vector<float>> logits[2];
    double fromCpu = 0;
    const int64_t splits[] = {1, 4};
    for (int run = 0; run < 2; ++run) {
      ASSERT_TRUE((*device)->chooseAttentionSplits(splits[run]).ok());
      KvCache cache = model->engine->newCache(), cpuCache = cpu->engine->newCache();
      std::vector<float> out, cpuOut;
      for (int64_t t = 0; t < tokens; ++t) {
        const int32_t id = static_cast<int32_t>((t * 7919 + 13) % model->spec.vocabSize);
        Status status = model->engine->forward(std::span<const int32_t>(&id, 1), cache, out);
        ASSERT_TRUE(status.ok()) << status.message();
        ASSERT_TRUE(cpu->engine->forward(std::span<const int32_t>(&id, 1), cpuCache, cpuOut).ok());
        fromCpu = std::max(fromCpu, maxDifference(cpuOut, out));
        logits[run].push_back(out);
      }
    }
    ASSERT_TRUE((*device)->chooseAttentionSplits(0).ok());
    double split = 0;
    for (size_t t = 0; t < logits[0].size(); ++t)
      split = std::max(split, maxDifference(logits[0][t], logits[1][t]));
    std::printf("attention %s: max |logit difference| four blocks a head vs one %.3g, either vs the CPU %.3g over "
                "%lld tokens\n",
                fixture.c_str(), split, fromCpu, static_cast<long long>(tokens));
    EXPECT_LE(fromCpu, 1e-3);
    EXPECT_LE(split, 1e-4);
    EXPECT_GT(split, 0.0) << "split runs add in another order: a zero difference means no split ran";
  }
  Expected<std::shared_ptr<Device>> device = openDevice(DeviceChoice::Cuda);
  ASSERT_TRUE(device) << device.status().message();
  EXPECT_FALSE((*device)->chooseAttentionSplits(65).ok());
  EXPECT_FALSE((*device)->chooseAttentionSplits(-1).ok());
}

TEST(CudaEngine, QueryHeadsOfOneKvHeadShareABlock) {
  REQUIRE_GPU();
  // Attention takes the query heads of a KV head a few at a time (the
  // largest power of two up to 8 dividing the group), reading each key and
  // value row once for them. The checkpoints' groups are 1 and 2; these
  // variants of qwen3_moe have groups of 8, 4 (heads of 16, and of 10: the
  // kernels' one-float paths) and 3 (which takes one head a block), decoded
  // token by token against the CPU engine with a head's positions split
  // over up to four blocks (one run up to 64 positions, then two), then a
  // prompt of 72 tokens as one step on the device (its blocks of heads
  // beside each other).
  const TemporaryDirectory root("moec-grouped-heads");
  struct Variant {
    int heads, kvHeads, headDim;
  };
  for (const Variant v : {Variant{8, 1, 16}, Variant{8, 2, 16}, Variant{8, 2, 10}, Variant{6, 2, 16}}) {
    const std::filesystem::path dir = root.path / (std::to_string(v.heads) + "-over-" + std::to_string(v.kvHeads) +
                                                   "-of-" + std::to_string(v.headDim));
    SCOPED_TRACE(dir.string());
    const Status written =
        moe::testing::writeGroupedVariant(dataDir() + "/hf/qwen3_moe", dir, v.heads, v.kvHeads, v.headDim);
    ASSERT_TRUE(written.ok()) << written.message();
    Expected<LoadedModel> cpu = loadModel(dir.string());
    ASSERT_TRUE(cpu) << cpu.status().message();
    ASSERT_EQ(cpu->spec.attention.numHeads, v.heads);
    ASSERT_EQ(cpu->spec.attention.numKeyValueHeads, v.kvHeads);
    ASSERT_EQ(cpu->spec.attention.headDim, v.headDim);
    auto [device, model] = moe::testing::loadOnCuda(dir.string());
    ASSERT_TRUE(model) << model.status().message();
    ASSERT_TRUE((*device)->chooseAttentionSplits(4).ok());
    KvCache cache = model->engine->newCache(), cpuCache = cpu->engine->newCache();
    std::vector<float> out, cpuOut;
    double decode = 0;
    for (int64_t t = 0; t < 100; ++t) {
      const int32_t id = static_cast<int32_t>((t * 7919 + 13) % model->spec.vocabSize);
      Status status = model->engine->forward(std::span<const int32_t>(&id, 1), cache, out);
      ASSERT_TRUE(status.ok()) << status.message();
      ASSERT_TRUE(cpu->engine->forward(std::span<const int32_t>(&id, 1), cpuCache, cpuOut).ok());
      decode = std::max(decode, maxDifference(cpuOut, out));
    }
    ASSERT_TRUE((*device)->choosePrefill("device").ok());
    std::vector<int32_t> prompt;
    for (int32_t i = 0; i < 72; ++i)
      prompt.push_back((i * 104729 + 7) % static_cast<int32_t>(model->spec.vocabSize));
    KvCache promptCache = model->engine->newCache(), cpuPromptCache = cpu->engine->newCache();
    Status status = model->engine->forward(prompt, promptCache, out);
    ASSERT_TRUE((*device)->choosePrefill("host").ok());
    ASSERT_TRUE(status.ok()) << status.message();
    ASSERT_TRUE(cpu->engine->forward(prompt, cpuPromptCache, cpuOut).ok());
    const double prefill = maxDifference(cpuOut, out);
    std::printf("%d query heads of %d over %d KV heads: max |logit difference| to the CPU %.3g over 100 decoded "
                "tokens, %.3g over a prompt of 72\n",
                v.heads, v.headDim, v.kvHeads, decode, prefill);
    EXPECT_LE(decode, 1e-3);
    EXPECT_LE(prefill, 1e-3);
  }
}

TEST(CudaEngine, PrefillOnTheDeviceMatchesTheCpuEngine) {
  REQUIRE_GPU();
  // Prompts on the decode path (Device::choosePrefill("device")): chunks of
  // Engine::kDeviceChunk tokens with the residual stream on the device, the
  // host routing each chunk's MoE layers. Every row's logits against the
  // CPU engine's, the host cache's rows, then decoding on from there. The
  // fixtures' prompts (outside MOEC_PARITY_QUICK) cross a chunk boundary,
  // and the KV mirror grows in the second chunk.
  for (const std::string &path : parityModels()) {
    SCOPED_TRACE(path);
    Expected<std::shared_ptr<Device>> device = openDevice(DeviceChoice::Cuda);
    ASSERT_TRUE(device) << device.status().message();
    ASSERT_TRUE((*device)->choosePrefill("device").ok());
    Expected<LoadedModel> cpu = loadModel(path);
    ASSERT_TRUE(cpu) << cpu.status().message();
    EngineOptions options;
    options.device = *device;
    Expected<LoadedModel> gpu = loadModel(path, options);
    ASSERT_TRUE(gpu) << gpu.status().message();
    const bool fixture = path.find("/fixtures/") != std::string::npos;
    const int64_t promptTokens = std::min<int64_t>(cpu->spec.maxPositions - 8, quickParity() ? 40 : fixture ? 300 : 48);
    std::vector<int32_t> prompt;
    for (int64_t i = 0; i < promptTokens; ++i)
      prompt.push_back(static_cast<int32_t>((i * 7919 + 13) % cpu->spec.vocabSize));
    KvCache cpuCache = cpu->engine->newCache(), gpuCache = gpu->engine->newCache();
    std::vector<float> cpuLogits, gpuLogits;
    cpu->engine->resetRoutingCounters();
    gpu->engine->resetRoutingCounters();
    ASSERT_TRUE(cpu->engine->forward(prompt, cpuCache, cpuLogits, false).ok());
    Status status = gpu->engine->forward(prompt, gpuCache, gpuLogits, false);
    ASSERT_TRUE(status.ok()) << status.message();
    ASSERT_EQ(gpuLogits.size(), cpuLogits.size()) << "every row's logits";
    ASSERT_NE(gpuCache.device, nullptr) << "the prompt took the decode path (the host's prefill makes no mirror)";
    const RoutingCounters cpuCounters = cpu->engine->routingCounters(), gpuCounters = gpu->engine->routingCounters();
    {
      // The last row alone (lastOnly), on a fresh cache: the same row.
      KvCache again = gpu->engine->newCache();
      std::vector<float> last;
      ASSERT_TRUE(gpu->engine->forward(prompt, again, last, true).ok());
      ASSERT_EQ(static_cast<int64_t>(last.size()), cpu->spec.vocabSize);
      std::vector<float> lastRow(gpuLogits.end() - cpu->spec.vocabSize, gpuLogits.end());
      // The head's product of one token against that of the chunk's rows
      // (tensor cores over a group-format head): float order apart.
      EXPECT_LE(maxDifference(last, lastRow), 1e-3) << "the last row's logits alone";
    }
    const double prefill = maxDifference(cpuLogits, gpuLogits);
    // Rows whose top token agrees.
    const int64_t V = cpu->spec.vocabSize;
    int64_t agree = 0;
    for (int64_t t = 0; t < promptTokens; ++t) {
      const auto row = [&](const std::vector<float> &l) { return l.begin() + t * V; };
      agree += std::max_element(row(cpuLogits), row(cpuLogits) + V) - row(cpuLogits) ==
               std::max_element(row(gpuLogits), row(gpuLogits) + V) - row(gpuLogits);
    }
    ASSERT_EQ(gpuCache.length, cpuCache.length);
    const double cacheDifference = maxCacheDifference(cpuCache, gpuCache);
    double decode = 0;
    for (int64_t t = 0; t < 4; ++t) {
      const int32_t id = static_cast<int32_t>((t * 31 + 7) % V);
      ASSERT_TRUE(cpu->engine->forward(std::span<const int32_t>(&id, 1), cpuCache, cpuLogits).ok());
      status = gpu->engine->forward(std::span<const int32_t>(&id, 1), gpuCache, gpuLogits);
      ASSERT_TRUE(status.ok()) << status.message();
      decode = std::max(decode, maxDifference(cpuLogits, gpuLogits));
    }
    std::printf("prefill on the device %s: %lld tokens, max |logit difference| %.3g (top-1 agreement %.4f), cache "
                "%.3g, decode after it %.3g; routed tokens %lld vs %lld, expert calls %lld vs %lld\n",
                std::filesystem::path(path).filename().c_str(), static_cast<long long>(promptTokens), prefill,
                static_cast<double>(agree) / static_cast<double>(promptTokens), cacheDifference, decode,
                static_cast<long long>(gpuCounters.routedTokens), static_cast<long long>(cpuCounters.routedTokens),
                static_cast<long long>(gpuCounters.expertCalls), static_cast<long long>(cpuCounters.expertCalls));
    EXPECT_EQ(gpuCounters.routedTokens, cpuCounters.routedTokens);
    if (path.find(".moepkg") == std::string::npos) {
      EXPECT_LE(prefill, 1e-3);
      EXPECT_LE(cacheDifference, 1e-3);
      EXPECT_LE(decode, 1e-3);
      EXPECT_EQ(gpuCounters.expertCalls, cpuCounters.expertCalls);
    } else {
      // int8 activations on either side of a rounding boundary (see the
      // parity test): the same choices almost everywhere.
      EXPECT_TRUE(std::isfinite(prefill) && std::isfinite(cacheDifference) && std::isfinite(decode));
      EXPECT_GE(static_cast<double>(agree), 0.95 * static_cast<double>(promptTokens));
    }
  }
}

TEST(CudaDevice, RoutingIsChosenByName) {
  REQUIRE_GPU();
  Expected<std::shared_ptr<Device>> opened = openDevice(DeviceChoice::Cuda);
  ASSERT_TRUE(opened) << opened.status().message();
  Device &device = **opened;
  EXPECT_TRUE(device.chooseRouting("device").ok());
  EXPECT_TRUE(device.chooseRouting("device-eager").ok());
  EXPECT_TRUE(device.chooseRouting("host").ok());
  expectRefused(device.chooseRouting("cpu"), "device, device-eager or host");
  EXPECT_FALSE(device.prefillsOnDevice()) << "prompts take the host's path unless asked";
  EXPECT_TRUE(device.choosePrefill("device").ok());
  EXPECT_TRUE(device.prefillsOnDevice());
  EXPECT_TRUE(device.choosePrefill("host").ok());
  EXPECT_FALSE(device.prefillsOnDevice());
  expectRefused(device.choosePrefill("gpu"), "unknown prefill 'gpu' (device or host)");
  EXPECT_TRUE(device.chooseLaunches("plain").ok());
  EXPECT_TRUE(device.chooseLaunches("dependent").ok());
  expectRefused(device.chooseLaunches("eager"), "unknown CUDA launches 'eager' (dependent or plain)");
  EXPECT_TRUE(device.chooseGraphs("layer").ok());
  EXPECT_TRUE(device.chooseGraphs("token").ok());
  expectRefused(device.chooseGraphs("none"), "unknown CUDA graphs 'none' (token or layer)");
  EXPECT_TRUE(device.chooseMoeKernels("apart").ok());
  EXPECT_TRUE(device.chooseMoeKernels("fused").ok());
  expectRefused(device.chooseMoeKernels("together"), "unknown CUDA MoE kernels 'together' (fused or apart)");
}
