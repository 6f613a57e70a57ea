//===- Device.cpp - Choosing a device and what it holds -------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Device.h"
#include "moe/Frontend/ModelSpec.h"

#include "moe/Runtime/Weights.h"

#include <algorithm>
#include <utility>

namespace moe {

#if MOEC_HAVE_CUDA
/// runtime/lib/CudaDevice.cpp: the CUDA device, or why there is none. A
/// lenient one leaves a matrix it cannot hold (device memory full) on the CPU.
Expected<std::shared_ptr<Device>> openCudaDevice(bool lenient);
bool cudaBuilt() { return true; }
#else
bool cudaBuilt() { return false; }
#endif

namespace {
CudaDeviceOpener replacedOpener = nullptr;
} // namespace

CudaDeviceOpener setCudaDeviceOpener(CudaDeviceOpener opener) { return std::exchange(replacedOpener, opener); }

Status Device::uploadLayer(LayerWeights &layer) {
  MOE_RETURN_IF_ERROR(forEachMatrix(layer, [&](Matrix &matrix) { return upload(matrix); }));
  return uploadVectors(layer);
}

Status Device::uploadGlobals(GlobalWeights &globals) {
  Matrix &projection = globals.lmHead.empty() ? globals.embedding : globals.lmHead;
  if (!projection.empty())
    MOE_RETURN_IF_ERROR(upload(projection));
  return uploadVectors(globals);
}

namespace {
Status noDecode() { return Status::error("this device does not decode with the residual stream on it"); }
} // namespace

Status Device::chooseProductKernel(std::string_view name) {
  return Status::error("this device has one product kernel, not a choice of '", name, "'");
}

Status Device::chooseLaunches(std::string_view name) {
  return Status::error("this device launches no kernels; no choice of '", name, "'");
}

Status Device::chooseGraphs(std::string_view name) {
  return Status::error("this device has no graphs; no choice of '", name, "'");
}

Status Device::chooseMoeKernels(std::string_view name) {
  return Status::error("this device does not route; no choice of MoE kernels '", name, "'");
}

Status Device::chooseAttentionSplits(int64_t most) {
  return Status::error("this device has no attention kernel to split; no choice of ", most, " blocks a head");
}

Status Device::decodeBegin(const float *, int64_t, int64_t, bool) { return noDecode(); }
Status Device::decodeAttention(const ModelSpec &, const LayerWeights &, int64_t, const float *, const float *, int64_t,
                               KvCache &, float *, float *) {
  return noDecode();
}
Status Device::decodeRoutedMlp(const ModelSpec &, const LayerSpec &, const LayerWeights &) {
  return Status::error("this device does not route");
}
Status Device::decodeMlp(std::span<const std::pair<const MlpWeights *, float>>, bool) { return noDecode(); }
Status Device::decodeRoutedBlock(std::span<const DeviceRoutedExpert>) { return noDecode(); }
Status Device::decodeAddBranch(const float *) { return noDecode(); }
Status Device::decodeEnd(const ModelSpec &, const GlobalWeights &, float *, int64_t &, int64_t) { return noDecode(); }
Status Device::chooseRouting(std::string_view name) {
  return Status::error("this device does not route; no choice of '", name, "'");
}
Status Device::choosePrefill(std::string_view name) {
  return Status::error("this device does not decode with the residual stream on it; no prefill '", name, "'");
}

bool deviceHolds(const MlpWeights &mlp) {
  return mlp.moreParts.empty() && mlp.gate.device && mlp.up.device && mlp.down.device;
}

bool deviceHoldsExperts(const LayerSpec &layer, const LayerWeights &w) {
  return std::all_of(w.experts.begin(), w.experts.end(), [](const MlpWeights &e) { return deviceHolds(e); }) &&
         (layer.shared.intermediateSize == 0 || deviceHolds(w.shared));
}

Expected<DeviceChoice> parseDeviceChoice(std::string_view name) {
  if (name == "cpu")
    return DeviceChoice::Cpu;
  if (name == "cuda")
    return DeviceChoice::Cuda;
  if (name == "auto")
    return DeviceChoice::Auto;
  return Status::error("--device '", std::string(name), "': expected cpu, cuda or auto");
}

Expected<std::shared_ptr<Device>> openDevice(DeviceChoice choice) {
  if (choice == DeviceChoice::Cpu)
    return std::shared_ptr<Device>();
  if (replacedOpener) {
    Expected<std::shared_ptr<Device>> device = replacedOpener(choice == DeviceChoice::Auto);
    if (!device && choice == DeviceChoice::Auto)
      return std::shared_ptr<Device>();
    return device;
  }
#if MOEC_HAVE_CUDA
  Expected<std::shared_ptr<Device>> device = openCudaDevice(choice == DeviceChoice::Auto);
  if (!device && choice == DeviceChoice::Auto)
    return std::shared_ptr<Device>();
  return device;
#else
  if (choice == DeviceChoice::Auto)
    return std::shared_ptr<Device>();
  return Status::error("--device cuda: this moec was built without CUDA (configure with the CUDA toolkit installed, "
                       "or -DMOEC_ENABLE_CUDA=ON); use --device cpu");
#endif
}

} // namespace moe
