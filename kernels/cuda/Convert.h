//===- Convert.h - Element-type conversion on the GPU -----------*- C++ -*-===//
//
// Part of moec. The first CUDA kernel: bf16 -> f32 conversion, tested
// against the scalar reference. It proves the CUDA toolchain wiring (nvcc,
// architectures, cudart) end to end; quantised matmul kernels follow.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CUDA_CONVERT_H
#define MOE_KERNELS_CUDA_CONVERT_H

#include "moe/Support/Status.h"

#include <cstddef>
#include <cstdint>

namespace moe::cuda {

/// Number of usable CUDA devices; 0 when there is no GPU or driver.
int deviceCount();

/// Converts `count` bf16 values (host memory) to f32 (host memory) on the
/// current device. Fails with a message when no device is usable.
Status convertBfloat16ToF32(const uint16_t *source, size_t count, float *destination);

} // namespace moe::cuda

#endif // MOE_KERNELS_CUDA_CONVERT_H
