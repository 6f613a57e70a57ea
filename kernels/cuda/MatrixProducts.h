//===- MatrixProducts.h - Matrix products of the engine on a GPU -*- C++ -*-===//
//
// Part of moec. A CUDA context that holds matrices in device memory in the
// layouts of kernels/common (f32, bf16, moec's group formats and ggml's
// Q4_0/Q4_1/Q8_0, which are the same bytes) and computes the engine's
// matrix products on them from host activations:
//   - `multiply`: several matrices that read the same input, T tokens;
//   - `experts`: one token's SwiGLU experts, weighted and summed.
// Group formats run as the CPU kernels do: the activation is rounded to
// int8 per weight group with the CPU's arithmetic (the same int8 values and
// scales), the codes are dotted in int32 (dp4a) and each group adds
// scale * sum + min * (the group's activation sum), so results differ from
// the CPU engine's only in the order of float additions. Nothing here
// knows a model; the runtime's CUDA device (runtime/lib/CudaDevice.cpp)
// maps its weights onto these calls.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CUDA_MATRIXPRODUCTS_H
#define MOE_KERNELS_CUDA_MATRIXPRODUCTS_H

#include "common/QuantFormat.h"
#include "moe/Support/Status.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

namespace moe::cuda {

enum class WeightLayout : uint8_t { F32, BF16, Group };

/// A row-major [rows, cols] matrix in device memory.
struct DeviceWeight {
  WeightLayout layout = WeightLayout::F32;
  quant::QuantFormat format;  ///< Group layout only.
  bool signedCodes = false;   ///< Group layout: ggml's Q8_0 (two's complement codes, no min).
  int64_t rows = 0, cols = 0;
  const void *data = nullptr; ///< Device memory.
  size_t bytes = 0;
};

/// One routed (or shared) expert of a token: y += weight * down(silu(gate x) * up x).
struct ExpertProduct {
  const DeviceWeight *gate = nullptr, *up = nullptr, *down = nullptr;
  float weight = 0.0f;
};

/// The device's copy bandwidth and what a kernel read, for benchmarks.
struct DeviceFacts {
  std::string name;
  int computeCapability = 0; ///< 90 for sm_90.
  size_t totalMemory = 0;
  int multiprocessors = 0;
  int driverVersion = 0, runtimeVersion = 0;
};

/// A device, its stream and its scratch buffers. Calls are serialised by a
/// mutex; each returns once its results are in host memory.
class Context {
public:
  /// Device 0; an error when the build has no usable device or driver.
  static Expected<std::shared_ptr<Context>> open();
  ~Context();
  Context(const Context &) = delete;
  Context &operator=(const Context &) = delete;

  const DeviceFacts &facts() const;

  /// Copies a matrix of `bytes` bytes from host memory; freed when the
  /// returned pointer is released. Checks that the bytes match the shape.
  Expected<std::shared_ptr<const DeviceWeight>> upload(WeightLayout layout, const quant::QuantFormat &format,
                                                       bool signedCodes, int64_t rows, int64_t cols,
                                                       const void *host, size_t bytes);

  /// For each of `count` (W, y): y[T, W.rows] = x[T, cols] W^T; x and every y are host
  /// memory, every W has `cols` columns.
  Status multiply(const float *x, int64_t tokens, int64_t cols, const std::pair<const DeviceWeight *, float *> *products,
                  size_t count);

  /// out[H] = sum_i weight_i * down_i(silu(gate_i x) * up_i x) over `count` experts of one token
  /// x[H] (host memory), the experts' outputs added in the given order.
  Status experts(const float *x, int64_t hidden, const ExpertProduct *experts, size_t count, float *out);

  /// Bytes of matrices held now.
  size_t residentBytes() const;

  /// Device-to-device copy bandwidth over `bytes` (read + written bytes
  /// per second), the roofline a benchmark compares with.
  Expected<double> copyBandwidth(size_t bytes, int repeats);

  /// Seconds the device spent in the calls since the last reset (CUDA
  /// events around each call's launches).
  double kernelSeconds() const;
  void resetKernelSeconds();

  struct State;

private:
  Context() = default;
  std::unique_ptr<State> state;
};

} // namespace moe::cuda

#endif // MOE_KERNELS_CUDA_MATRIXPRODUCTS_H
