//===- Launch.h - One way to launch a kernel -------------------*- C++ -*-===//
//
// Part of moec. `launchKernel(kernel, grid, block, on, args...)` is
// kernel<<<grid, block, 0, stream>>>(args...) under nvcc, and enqueues the
// kernel's threads on the emulated stream when kernels/cuda is compiled as
// C++ for the CPU (emulation/CudaEmulation.h), with the arguments copied as
// a launch copies them.
//
// A launch on a `LaunchStream` whose `dependent` is set is a programmatic
// dependent launch (sm_90 and later): the GPU may start the kernel's
// blocks while the kernel before it in the stream still runs, so that a
// chain of small kernels (a decoded token's) does not pay a kernel's
// launch and drain between each two. Every kernel so launched calls
// awaitPreviousKernel() first, before it reads or writes device memory:
// it waits there until the kernel before it has finished and its writes
// are visible, then lets the kernel after it start its blocks. A kernel
// that did not wait could finish before its predecessor and release its
// successor early; the emulation fails such a launch.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CUDA_LAUNCH_H
#define MOE_KERNELS_CUDA_LAUNCH_H

#include <cuda_runtime.h>

#include <tuple>
#include <type_traits>
#include <utility>

namespace moe::cuda {

/// A stream to launch on, and whether its launches may overlap the kernel
/// before them (programmatic dependent launch; only where the device has
/// it, compute capability 9.0 or later).
struct LaunchStream {
  cudaStream_t stream = nullptr;
  bool dependent = false;
};

/// The first statement of every kernel launched on a dependent
/// LaunchStream (and harmless in any other launch): waits until the kernel
/// before this one in its stream has finished and flushed its writes, then
/// allows the kernel after this one to start. Every thread calls it.
__device__ __forceinline__ void awaitPreviousKernel() {
#if MOEC_CUDA_EMULATION
  emulation::awaitPreviousGrid();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

template <typename... Params, typename... Args>
void launchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, LaunchStream on, Args &&...args) {
#if MOEC_CUDA_EMULATION
  emulation::launch(
      grid, block, on.stream,
      [kernel, arguments = std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)] {
        std::apply(kernel, arguments);
      },
      on.dependent);
#else
  if (!on.dependent) {
    kernel<<<grid, block, 0, on.stream>>>(std::forward<Args>(args)...);
    return;
  }
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = on.stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  // An error here is the next cudaGetLastError, as a <<<>>> launch's is.
  (void)cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
#endif
}

/// A launch in `stream` that waits for everything before it.
template <typename... Params, typename... Args>
void launchKernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args &&...args) {
  launchKernel(kernel, grid, block, LaunchStream{stream, false}, std::forward<Args>(args)...);
}

} // namespace moe::cuda

#endif // MOE_KERNELS_CUDA_LAUNCH_H
