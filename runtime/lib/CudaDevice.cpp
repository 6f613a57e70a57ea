//===- CudaDevice.cpp - The engine's matrix products on a CUDA GPU --------===//
//
// Part of moec. Maps the runtime's matrices onto kernels/cuda's Context:
// a Matrix in f32, bf16, a moec group format or ggml's Q4_0/Q4_1/Q8_0 is
// copied as it is stored; other ggml blocks stay on the CPU.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Device.h"

#include "cuda/MatrixProducts.h"
#include "moe/Runtime/Weights.h"

#include <cstdio>
#include <vector>

namespace moe {

Expected<std::shared_ptr<Device>> openCudaDevice();

namespace {

class CudaMatrix final : public DeviceMatrix {
public:
  CudaMatrix(std::shared_ptr<Device> owner, std::shared_ptr<const cuda::DeviceWeight> weight)
      : owner(std::move(owner)), weight(std::move(weight)) {}
  Device &device() const override { return *owner; }
  const cuda::DeviceWeight &get() const { return *weight; }

private:
  std::shared_ptr<Device> owner;
  std::shared_ptr<const cuda::DeviceWeight> weight;
};

const cuda::DeviceWeight &deviceWeight(const Matrix &matrix) {
  return static_cast<const CudaMatrix &>(*matrix.device).get();
}

class CudaDevice final : public Device {
public:
  explicit CudaDevice(std::shared_ptr<cuda::Context> context) : context(std::move(context)) {}

  std::string description() const override {
    const cuda::DeviceFacts &f = context->facts();
    char text[256];
    std::snprintf(text, sizeof text, "cuda: %s (sm_%d, %d SMs, %.1f GiB, driver %d.%d, runtime %d.%d)",
                  f.name.c_str(), f.computeCapability, f.multiprocessors,
                  static_cast<double>(f.totalMemory) / (1 << 30), f.driverVersion / 1000,
                  f.driverVersion % 1000 / 10, f.runtimeVersion / 1000, f.runtimeVersion % 1000 / 10);
    return text;
  }

  Status upload(Matrix &matrix) override {
    if (matrix.device || matrix.empty())
      return Status::success();
    cuda::WeightLayout layout;
    quant::QuantFormat format;
    bool signedCodes = false;
    const void *data = nullptr;
    size_t bytes = 0;
    if (const std::optional<quant::QuantMatrixView> view = matrix.groupView()) {
      layout = cuda::WeightLayout::Group;
      format = view->format;
      signedCodes = view->signedCodes;
      data = matrix.quantData;
      bytes = format.matrixBytes(matrix.rows, matrix.cols);
    } else if (matrix.isQuantized()) {
      return Status::success(); // K-quants and Q5_*: the CPU's kernels.
    } else if (matrix.isBf16()) {
      layout = cuda::WeightLayout::BF16;
      data = matrix.bf16.data();
      bytes = matrix.bf16.size() * sizeof(uint16_t);
    } else {
      layout = cuda::WeightLayout::F32;
      data = matrix.data.data();
      bytes = matrix.data.size() * sizeof(float);
    }
    Expected<std::shared_ptr<const cuda::DeviceWeight>> weight =
        context->upload(layout, format, signedCodes, matrix.rows, matrix.cols, data, bytes);
    if (!weight)
      return Status::error(weight.status().message(), " (run with --device cpu, or a smaller --max-memory)");
    matrix.device = std::make_shared<CudaMatrix>(shared_from_this(), weight.take());
    return Status::success();
  }

  void linear(const Matrix &weight, const float *x, int64_t tokens, float *y) override {
    const std::pair<const cuda::DeviceWeight *, float *> product{&deviceWeight(weight), y};
    record(context->multiply(x, tokens, weight.cols, &product, 1));
  }

  void linearTogether(const float *x, int64_t cols,
                      std::span<const std::pair<const Matrix *, float *>> products) override {
    thread_local std::vector<std::pair<const cuda::DeviceWeight *, float *>> jobs;
    jobs.clear();
    for (const auto &[matrix, y] : products)
      jobs.emplace_back(&deviceWeight(*matrix), y);
    record(context->multiply(x, 1, cols, jobs.data(), jobs.size()));
  }

  void experts(std::span<const std::pair<const MlpWeights *, float>> mlps, const float *x, int64_t hidden,
               float *out) override {
    thread_local std::vector<cuda::ExpertProduct> jobs;
    jobs.clear();
    for (const auto &[mlp, weight] : mlps)
      jobs.push_back({&deviceWeight(mlp->gate), &deviceWeight(mlp->up), &deviceWeight(mlp->down), weight});
    record(context->experts(x, hidden, jobs.data(), jobs.size(), out));
  }

  Status takeError() override {
    Status taken = std::move(error);
    error = Status::success();
    return taken;
  }
  size_t residentBytes() const override { return context->residentBytes(); }
  double busySeconds() const override { return context->kernelSeconds(); }
  void resetBusySeconds() override { context->resetKernelSeconds(); }
  Expected<double> copyBandwidth() override { return context->copyBandwidth(size_t(1) << 30, 10); }

private:
  void record(Status status) {
    if (!status.ok() && error.ok())
      error = std::move(status);
  }

  std::shared_ptr<cuda::Context> context;
  Status error = Status::success();
};

} // namespace

Expected<std::shared_ptr<Device>> openCudaDevice() {
  Expected<std::shared_ptr<cuda::Context>> context = cuda::Context::open();
  if (!context)
    return Status::error("--device cuda: ", context.status().message());
  return std::shared_ptr<Device>(std::make_shared<CudaDevice>(context.take()));
}

} // namespace moe
