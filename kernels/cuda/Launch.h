//===- Launch.h - One way to launch a kernel -------------------*- C++ -*-===//
//
// Part of moec. `launchKernel(kernel, grid, block, stream, args...)` is
// kernel<<<grid, block, 0, stream>>>(args...) under nvcc, and enqueues the
// kernel's threads on the emulated stream when kernels/cuda is compiled as
// C++ for the CPU (emulation/CudaEmulation.h), with the arguments copied as
// a launch copies them.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CUDA_LAUNCH_H
#define MOE_KERNELS_CUDA_LAUNCH_H

#include <cuda_runtime.h>

#include <tuple>
#include <type_traits>
#include <utility>

namespace moe::cuda {

template <typename... Params, typename... Args>
void launchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args &&...args) {
#if MOEC_CUDA_EMULATION
  emulation::launch(grid, block, stream,
                    [kernel, arguments = std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)] {
                      std::apply(kernel, arguments);
                    });
#else
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

} // namespace moe::cuda

#endif // MOE_KERNELS_CUDA_LAUNCH_H
