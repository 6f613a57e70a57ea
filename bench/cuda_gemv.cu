//===- cuda_gemv.cu - Bandwidth of the quantized GEMV on a GPU ------------===//
//
// Part of moec. For each format: y = W x on a [rows, cols] matrix resident
// on the GPU, timed with CUDA events over repeated launches; reports the
// matrix bytes read per second against a device-to-device copy of the same
// bytes (which reads and writes them). One JSON object per line.
//
// Usage: cuda_gemv [--rows R] [--cols C] [--repeat N]
//
//===----------------------------------------------------------------------===//

#include "cuda/QuantGemv.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace moe;

namespace {

void require(cudaError_t error, const char *what) {
  if (error != cudaSuccess) {
    std::fprintf(stderr, "cuda_gemv: %s: %s\n", what, cudaGetErrorString(error));
    std::exit(1);
  }
}

} // namespace

int main(int argc, char **argv) {
  int64_t rows = 32768, cols = 8192;
  int repeat = 50;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--rows"))
      rows = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--cols"))
      cols = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--repeat"))
      repeat = std::atoi(argv[i + 1]);
  }
  cudaDeviceProp properties;
  require(cudaGetDeviceProperties(&properties, 0), "device properties");
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> weights(static_cast<size_t>(rows * cols)), x(static_cast<size_t>(cols));
  for (float &w : weights)
    w = 0.02f * normal(rng);
  for (float &v : x)
    v = normal(rng);
  float *deviceX = nullptr, *deviceY = nullptr;
  require(cudaMalloc(&deviceX, x.size() * sizeof(float)), "malloc");
  require(cudaMalloc(&deviceY, static_cast<size_t>(rows) * sizeof(float)), "malloc");
  require(cudaMemcpy(deviceX, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice), "copy");
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  auto time = [&](auto &&body) {
    for (int i = 0; i < 3; ++i)
      body();
    cudaEventRecord(start);
    for (int i = 0; i < repeat; ++i)
      body();
    cudaEventRecord(stop);
    require(cudaEventSynchronize(stop), "synchronize");
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    return static_cast<double>(ms) / 1e3 / repeat;
  };
  const char *formats[] = {"q4_g128_asym", "q4_g128_sym", "q4_g64_asym", "q4_g32_sym", "q8_g128_sym",
                           "q3_g128_asym", "q3_g64_sym",  "q2_g64_asym", "q2_g32_asym"};
  for (const char *name : formats) {
    quant::QuantFormat format = *quant::parseQuantFormat(name);
    const size_t bytes = format.matrixBytes(rows, cols);
    std::vector<uint8_t> packed(bytes);
    quant::quantizeReference(format, weights.data(), rows, cols, packed.data());
    uint8_t *deviceW = nullptr, *copy = nullptr;
    require(cudaMalloc(&deviceW, bytes), "malloc");
    require(cudaMalloc(&copy, bytes), "malloc");
    require(cudaMemcpy(deviceW, packed.data(), bytes, cudaMemcpyHostToDevice), "copy");
    std::string failure;
    const double seconds = time([&] {
      if (!failure.empty())
        return;
      Status launched = cuda::gemvQuantizedDevice(format, deviceW, rows, cols, deviceX, deviceY);
      if (!launched.ok())
        failure = launched.message();
    });
    if (!failure.empty()) {
      std::fprintf(stderr, "cuda_gemv: %s\n", failure.c_str());
      return 1;
    }
    const double copySeconds = time([&] { cudaMemcpy(copy, deviceW, bytes, cudaMemcpyDeviceToDevice); });
    std::printf("{\"device\": \"%s\", \"format\": \"%s\", \"rows\": %lld, \"cols\": %lld, \"bytes\": %zu, "
                "\"microseconds\": %.2f, \"gb_per_s\": %.1f, \"copy_read_gb_per_s\": %.1f, "
                "\"fraction_of_copy_read\": %.2f}\n",
                properties.name, name, static_cast<long long>(rows), static_cast<long long>(cols), bytes, seconds * 1e6,
                bytes / seconds / 1e9, bytes / copySeconds / 1e9, (bytes / seconds) / (bytes / copySeconds));
    cudaFree(deviceW);
    cudaFree(copy);
  }
  return 0;
}
