//===- Convert.cu - Element-type conversion on the GPU --------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Convert.h"

#include "Check.h"
#include "cuda/Launch.h"

#include <cuda_runtime.h>

namespace moe::cuda {
namespace {

__global__ void bfloat16ToF32Kernel(const uint16_t *source, size_t count, float *destination) {
  size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride)
    destination[i] = __uint_as_float(static_cast<uint32_t>(source[i]) << 16);
}

/// Device memory freed on scope exit.
template <typename T> struct DeviceBuffer {
  T *data = nullptr;
  Status allocate(size_t count) { return check(cudaMalloc(&data, count * sizeof(T)), "malloc"); }
  ~DeviceBuffer() {
    if (data)
      cudaFree(data);
  }
};

} // namespace

int deviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError(); // clear the sticky "no device" error
    return 0;
  }
  return count;
}

Status convertBfloat16ToF32(const uint16_t *source, size_t count, float *destination) {
  if (deviceCount() == 0)
    return Status::error("no CUDA device available");
  if (count == 0)
    return Status::success();
  DeviceBuffer<uint16_t> deviceSource;
  DeviceBuffer<float> deviceDestination;
  MOE_RETURN_IF_ERROR(deviceSource.allocate(count));
  MOE_RETURN_IF_ERROR(deviceDestination.allocate(count));
  MOE_RETURN_IF_ERROR(
      check(cudaMemcpy(deviceSource.data, source, count * sizeof(uint16_t), cudaMemcpyHostToDevice), "copy to device"));
  size_t blocks = (count + 255) / 256 < 4096 ? (count + 255) / 256 : 4096;
  launchKernel(bfloat16ToF32Kernel, static_cast<unsigned>(blocks), 256, nullptr, deviceSource.data, count,
               deviceDestination.data);
  MOE_RETURN_IF_ERROR(check(cudaGetLastError(), "kernel launch"));
  return check(cudaMemcpy(destination, deviceDestination.data, count * sizeof(float), cudaMemcpyDeviceToHost),
               "copy to host");
}

} // namespace moe::cuda
