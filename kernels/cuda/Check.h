//===- Check.h - A CUDA runtime error as a Status ---------------*- C++ -*-===//
//
// Part of moec. Internal to kernels/cuda.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CUDA_CHECK_H
#define MOE_KERNELS_CUDA_CHECK_H

#include "moe/Support/Status.h"

#include <cuda_runtime.h>

namespace moe::cuda {

/// Success, or "CUDA <what>: <the runtime's message>".
inline Status check(cudaError_t error, const char *what) {
  if (error == cudaSuccess)
    return Status::success();
  return Status::error("CUDA ", what, ": ", cudaGetErrorString(error));
}

} // namespace moe::cuda

#endif // MOE_KERNELS_CUDA_CHECK_H
