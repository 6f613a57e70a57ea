//===- EmulatedDevice.cpp - The GPU tests on the CPU emulation of CUDA ----===//
//
// Part of moec. Installs the CUDA device over the CPU emulation
// (runtime/lib/EmulatedCudaDevice.cpp) before any test runs, so that
// openDevice(DeviceChoice::Cuda) in moec-cuda-emulated-tests opens it.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Device.h"

namespace moe {
Expected<std::shared_ptr<Device>> openEmulatedCudaDevice(bool lenient);
} // namespace moe

namespace {
const bool installed = [] {
  moe::setCudaDeviceOpener(&moe::openEmulatedCudaDevice);
  return true;
}();
} // namespace
