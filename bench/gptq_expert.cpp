//===- gptq_expert.cpp - The cost of GPTQ for one expert of real shape ----===//
//
// Part of moec. GPTQ of one routed expert as moe-quantize runs it (the
// input Hessian factored once for gate and up, the intermediate Hessian for
// down), at a model's shapes (default DeepSeek-V3's: hidden 7168, width
// 2048), in double and in float arithmetic (moe-quantize's `precision`).
// Random weights and Hessians of random routed inputs: GPTQ's cost does not
// depend on their values. Beside it, in the same run, the rate of the
// machine's BLAS on the lazy update's GEMM shape (dgemm and sgemm), so the
// times read as a fraction of what the machine can do. Also how far f32's
// codes are from f64's: the share of codes that differ and each one's
// output error on the inputs, tr((W - Q) H (W - Q)^T), relative to the
// weights'. Prints JSON.
//
//   gptq_expert [--hidden H] [--width W] [--tokens T] [--bits B] [--group G]
//               [--experts E] [--threads N]
//   gptq_expert --rows R --cols C [--tokens T] [--bits B] [--group G]
//
// --rows/--cols: one matrix instead (an attention projection: DeepSeek-V3's
// o_proj is --rows 7168 --cols 16384), its own Hessian factored and the
// matrix quantised, on one BLAS thread as a moe-quantize job runs it, in
// double and in float: the seconds of each.
//
// --experts E: experts quantised concurrently (one thread and one BLAS
// thread each) in the "parallel" timing; the "serial" timing runs them one
// after another with N BLAS threads. The projection a model's GPTQ cost is
// estimated from is the best of the two.
//
//===----------------------------------------------------------------------===//

#include "../passes/lib/Gptq.h"
#include "common/QuantFormat.h"

#include <Eigen/Dense>
#include <cblas.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <thread>

extern "C" void openblas_set_num_threads(int);

using namespace moe;
using Clock = std::chrono::steady_clock;
using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace {

double secondsSince(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

struct Expert {
  std::vector<float> gate, up, down; // [width, hidden], [width, hidden], [hidden, width]
  std::vector<double> input, middle; // Hessians: [hidden, hidden], [width, width]
};

std::vector<float> randomWeights(int64_t count, std::mt19937_64 &random) {
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> weights(static_cast<size_t>(count));
  for (float &w : weights)
    w = normal(random);
  return weights;
}

/// X^T X of `tokens` random inputs of `cols` values (heavy-tailed scales
/// per dimension, as real activations have).
std::vector<double> randomHessian(int64_t cols, int64_t tokens, std::mt19937_64 &random) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> scale(static_cast<size_t>(cols));
  for (double &s : scale)
    s = std::exp(normal(random));
  RowMatrix X(tokens, cols);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < cols; ++c)
      X(t, c) = normal(random) * scale[c];
  std::vector<double> hessian(static_cast<size_t>(cols * cols));
  Eigen::Map<RowMatrix>(hessian.data(), cols, cols).noalias() = X.transpose() * X;
  return hessian;
}

Expert randomExpert(int64_t hidden, int64_t width, int64_t tokens, uint64_t seed) {
  std::mt19937_64 random(seed);
  Expert e;
  e.gate = randomWeights(width * hidden, random);
  e.up = randomWeights(width * hidden, random);
  e.down = randomWeights(hidden * width, random);
  e.input = randomHessian(hidden, tokens, random);
  e.middle = randomHessian(width, tokens, random);
  return e;
}

struct Codes {
  std::vector<uint8_t> gate, up, down;
};

/// One expert's GPTQ as moe-quantize runs it.
Codes quantizeExpert(const quant::QuantFormat &format, const Expert &e, int64_t hidden, int64_t width,
                     const GptqOptions &options) {
  auto fail = [](const Status &status) {
    std::cerr << "gptq_expert: " << status.message() << "\n";
    std::exit(1);
  };
  Codes codes;
  Expected<std::shared_ptr<const GptqFactor>> input = factorGptqHessian(e.input, hidden, options);
  if (!input)
    fail(input.status());
  for (auto [weights, out] : {std::pair{&e.gate, &codes.gate}, std::pair{&e.up, &codes.up}})
    if (Status s = quantizeGptq(format, *weights, width, hidden, **input, options, *out); !s.ok())
      fail(s);
  if (Status s = quantizeGptq(format, e.down, hidden, width, e.middle, options, codes.down); !s.ok())
    fail(s);
  return codes;
}

/// Seconds for `experts` experts: one after another (BLAS on `threads`
/// threads), or concurrently (one thread each, BLAS single-threaded).
double timeExperts(const quant::QuantFormat &format, const std::vector<Expert> &experts, int64_t hidden, int64_t width,
                   const GptqOptions &options, bool concurrent, int threads, int blasThreadsWhenConcurrent = 1) {
  const Clock::time_point start = Clock::now();
  if (!concurrent) {
    openblas_set_num_threads(threads);
    for (const Expert &e : experts)
      quantizeExpert(format, e, hidden, width, options);
  } else {
    openblas_set_num_threads(blasThreadsWhenConcurrent);
    std::vector<std::thread> workers;
    for (const Expert &e : experts)
      workers.emplace_back([&] { quantizeExpert(format, e, hidden, width, options); });
    for (std::thread &w : workers)
      w.join();
  }
  return secondsSince(start);
}

/// GFLOP/s of C -= A B at the lazy update's shape (rows x cols, inner
/// `inner`), best of 3.
template <typename Scalar> double gemmRate(int64_t rows, int64_t cols, int64_t inner, int threads) {
  openblas_set_num_threads(threads);
  std::vector<Scalar> a(static_cast<size_t>(rows * inner), Scalar(0.001)),
      b(static_cast<size_t>(inner * cols), Scalar(0.002)), c(static_cast<size_t>(rows * cols), Scalar(0));
  double best = 0;
  for (int i = 0; i < 3; ++i) {
    const Clock::time_point start = Clock::now();
    if constexpr (std::is_same_v<Scalar, double>)
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, cols, inner, -1.0, a.data(), inner, b.data(), cols,
                  1.0, c.data(), cols);
    else
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, cols, inner, -1.0f, a.data(), inner, b.data(), cols,
                  1.0f, c.data(), cols);
    best = std::max(best, 2.0 * rows * cols * inner / secondsSince(start) / 1e9);
  }
  return best;
}

/// tr((W - Q) H (W - Q)^T) / tr(W H W^T): the output error on the inputs.
double relativeOutputError(const quant::QuantFormat &format, const std::vector<float> &weights,
                           const std::vector<uint8_t> &codes, const std::vector<double> &hessian, int64_t rows,
                           int64_t cols) {
  std::vector<float> decoded(weights.size());
  quant::dequantizeReference(format, codes.data(), rows, cols, decoded.data());
  RowMatrix W = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(weights.data(),
                                                                                                        rows, cols)
                    .cast<double>();
  RowMatrix D = W - Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
                        decoded.data(), rows, cols)
                        .cast<double>();
  Eigen::Map<const RowMatrix> H(hessian.data(), cols, cols);
  return (D * H).cwiseProduct(D).sum() / (W * H).cwiseProduct(W).sum();
}

double differingShare(const std::vector<uint8_t> &a, const std::vector<uint8_t> &b) {
  int64_t differ = 0;
  for (size_t i = 0; i < a.size(); ++i)
    differ += a[i] != b[i];
  return static_cast<double>(differ) / static_cast<double>(a.size());
}

} // namespace

/// --rows/--cols: one matrix's GPTQ (factor and quantise) on one BLAS thread.
int timeOneMatrix(const quant::QuantFormat &format, int64_t rows, int64_t cols, int64_t tokens) {
  std::mt19937_64 random(4321);
  const std::vector<float> weights = randomWeights(rows * cols, random);
  const std::vector<double> hessian = randomHessian(cols, tokens, random);
  const double flops = 2.0 * rows * double(cols) * cols + 2.0 / 3.0 * double(cols) * cols * cols;
  nlohmann::json out = {{"rows", rows},        {"cols", cols},          {"tokens", tokens},
                        {"bits", format.bits}, {"group", format.group}, {"gflop", flops / 1e9}};
  openblas_set_num_threads(1);
  for (GptqPrecision precision : {GptqPrecision::F32, GptqPrecision::F64}) {
    GptqOptions options;
    options.precision = precision;
    std::vector<uint8_t> codes;
    const Clock::time_point start = Clock::now();
    Expected<std::shared_ptr<const GptqFactor>> factor = factorGptqHessian(hessian, cols, options);
    if (!factor) {
      std::cerr << "gptq_expert: " << factor.status().message() << "\n";
      return 1;
    }
    const double factored = secondsSince(start);
    if (Status s = quantizeGptq(format, weights, rows, cols, **factor, options, codes); !s.ok()) {
      std::cerr << "gptq_expert: " << s.message() << "\n";
      return 1;
    }
    const double seconds = secondsSince(start);
    out[precision == GptqPrecision::F64 ? "f64" : "f32"] = {
        {"seconds", seconds}, {"factor_seconds", factored}, {"gflops", flops / seconds / 1e9}};
  }
  out["sgemm_one_thread_gflops"] = gemmRate<float>(std::min<int64_t>(rows, 2048), cols, 128, 1);
  std::cout << out.dump(2) << std::endl;
  return 0;
}

int main(int argc, char **argv) {
  int64_t hidden = 7168, width = 2048, tokens = 256, bits = 4, group = 128, experts = 2, rows = 0, cols = 0;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const int64_t value = std::atoll(argv[i + 1]);
    if (flag == "--hidden")
      hidden = value;
    else if (flag == "--width")
      width = value;
    else if (flag == "--tokens")
      tokens = value;
    else if (flag == "--bits")
      bits = value;
    else if (flag == "--group")
      group = value;
    else if (flag == "--experts")
      experts = value;
    else if (flag == "--threads")
      threads = static_cast<int>(value);
    else if (flag == "--rows")
      rows = value;
    else if (flag == "--cols")
      cols = value;
    else {
      std::cerr << "gptq_expert: unknown option " << flag << "\n";
      return 2;
    }
  }
  if (hidden <= 0 || width <= 0 || tokens <= 0 || experts <= 0 || threads <= 0 || hidden % group || width % group) {
    std::cerr << "gptq_expert: sizes must be positive and whole groups\n";
    return 2;
  }
  const quant::QuantFormat format{static_cast<int>(bits), static_cast<int>(group), false};
  if (std::string error = quant::validateQuantFormat(format); !error.empty()) {
    std::cerr << "gptq_expert: " << error << "\n";
    return 2;
  }
  if (rows != 0 || cols != 0) {
    if (rows <= 0 || cols <= 0 || cols % group) {
      std::cerr << "gptq_expert: --rows and --cols must be positive, --cols whole groups\n";
      return 2;
    }
    return timeOneMatrix(format, rows, cols, tokens);
  }
  std::vector<Expert> set;
  for (int64_t e = 0; e < experts; ++e)
    set.push_back(randomExpert(hidden, width, tokens, 1234 + static_cast<uint64_t>(e)));

  // Flops per expert: the lazy updates (2 rows cols^2 per matrix, minus the
  // blocks' own triangle, ignored) and the factorisations (n^3/3 each for
  // Cholesky and the triangular inverse).
  const double flops = 2 * (2.0 * width * hidden * hidden) + 2.0 * hidden * width * width +
                       2.0 / 3.0 * (double(hidden) * hidden * hidden + double(width) * width * width);
  nlohmann::json out = {
      {"hidden", hidden}, {"width", width},     {"tokens", tokens},   {"bits", bits},
      {"group", group},   {"experts", experts}, {"threads", threads}, {"gflop_per_expert", flops / 1e9}};
  out["blas_gflops"] = {{"dgemm", gemmRate<double>(width, hidden, 128, threads)},
                        {"sgemm", gemmRate<float>(width, hidden, 128, threads)},
                        {"dgemm_one_thread", gemmRate<double>(width, hidden, 128, 1)},
                        {"sgemm_one_thread", gemmRate<float>(width, hidden, 128, 1)}};
  std::map<std::string, Codes> codes;
  for (GptqPrecision precision : {GptqPrecision::F64, GptqPrecision::F32}) {
    const std::string name = precision == GptqPrecision::F64 ? "f64" : "f32";
    GptqOptions options;
    options.precision = precision;
    const double serial = timeExperts(format, set, hidden, width, options, false, threads);
    const double parallel = timeExperts(format, set, hidden, width, options, true, threads);
    // What moe-quantize did before: experts concurrently, each BLAS call
    // free to use every thread (oversubscribed).
    const double oversubscribed = timeExperts(format, set, hidden, width, options, true, threads, threads);
    const double best = std::min(serial, parallel);
    out[name] = {{"seconds_serial", serial},
                 {"seconds_concurrent", parallel},
                 {"seconds_concurrent_blas_threads", oversubscribed},
                 {"seconds_per_expert", best / double(experts)},
                 {"gflops", flops * double(experts) / best / 1e9}};
    codes[name] = quantizeExpert(format, set[0], hidden, width, options);
  }
  const Expert &e = set[0];
  for (const std::string &name : {std::string("f64"), std::string("f32")}) {
    const Codes &c = codes[name];
    out[name]["relative_output_error"] = {
        {"gate", relativeOutputError(format, e.gate, c.gate, e.input, width, hidden)},
        {"up", relativeOutputError(format, e.up, c.up, e.input, width, hidden)},
        {"down", relativeOutputError(format, e.down, c.down, e.middle, hidden, width)}};
  }
  out["f32_bytes_differing"] = {{"gate", differingShare(codes["f64"].gate, codes["f32"].gate)},
                                {"up", differingShare(codes["f64"].up, codes["f32"].up)},
                                {"down", differingShare(codes["f64"].down, codes["f32"].down)}};
  std::cout << out.dump(2) << std::endl;
  return 0;
}
