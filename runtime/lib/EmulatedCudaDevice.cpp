//===- EmulatedCudaDevice.cpp - The CUDA device over the CPU emulation ----===//
//
// Part of moec. CudaDevice.cpp over kernels/cuda compiled for the CPU
// emulation of CUDA (kernels/cuda/emulation): openEmulatedCudaDevice, which
// the GPU tests install with setCudaDeviceOpener where no GPU is present.
//
//===----------------------------------------------------------------------===//

#define openCudaDevice openEmulatedCudaDevice
#include "CudaDevice.cpp"
