//===- CudaDevice.cpp - The engine's matrix products on a CUDA GPU --------===//
//
// Part of moec. Maps the runtime's matrices onto kernels/cuda's Context:
// a Matrix in f32, bf16, a moec group format or ggml's Q4_0/Q4_1/Q8_0 is
// copied as it is stored; other ggml blocks stay on the CPU. A MoE layer
// the device holds whole is prepared for routing on the device at its
// first decoded token.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Device.h"

#include "Router.h"
#include "cuda/MatrixProducts.h"
#include "moe/Runtime/Engine.h"
#include "moe/Runtime/Weights.h"

#include <algorithm>
#include <cstdio>
#include <set>
#include <vector>

namespace moe {

Expected<std::shared_ptr<Device>> openCudaDevice(bool lenient);

namespace {

class CudaMatrix final : public DeviceMatrix {
public:
  CudaMatrix(std::shared_ptr<Device> owner, std::shared_ptr<const cuda::DeviceWeight> weight)
      : owner(std::move(owner)), weight(std::move(weight)) {}
  Device &device() const override { return *owner; }
  const cuda::DeviceWeight &get() const { return *weight; }
  /// A dense MLP's decode launches as a CUDA graph, kept with its gate
  /// matrix so that it lives and dies with the layer (decodeMlp).
  mutable std::shared_ptr<cuda::DecodeGraph> mlpGraph;

private:
  std::shared_ptr<Device> owner;
  std::shared_ptr<const cuda::DeviceWeight> weight;
};

const cuda::DeviceWeight &deviceWeight(const Matrix &matrix) {
  return static_cast<const CudaMatrix &>(*matrix.device).get();
}

/// Device copies of a layer's or the model's vectors (LayerWeights::
/// deviceVectors): null where the host vector is empty.
struct CudaVectors {
  std::vector<std::shared_ptr<const cuda::DeviceWeight>> held;
  const float *attentionNorm = nullptr, *attentionNormBias = nullptr, *mlpNorm = nullptr, *mlpNormBias = nullptr;
  const float *queryBias = nullptr, *keyBias = nullptr, *valueBias = nullptr, *outputBias = nullptr;
  const float *queryNorm = nullptr, *keyNorm = nullptr;
  const float *queryDownNorm = nullptr, *kvDownNorm = nullptr; ///< MLA's low-rank norms.
  const float *finalNorm = nullptr, *finalNormBias = nullptr, *lmHeadBias = nullptr;
  const cuda::DeviceWeight *router = nullptr; ///< A MoE layer's router, for decode.
  /// The layer as the device routes it (CudaDevice::routesOnDevice, at
  /// the first decoded token): null where it cannot.
  mutable std::shared_ptr<const cuda::RoutedLayerHandle> routed;
  mutable bool routedTried = false;
  /// The layer's decode launches as a CUDA graph (made at its second token);
  /// for the model's vectors, the token's end (decodeEnd).
  mutable std::shared_ptr<cuda::DecodeGraph> attentionGraph, endGraph;
};

class CudaDevice final : public Device {
public:
  CudaDevice(std::shared_ptr<cuda::Context> context, bool lenient) : context(std::move(context)), lenient(lenient) {}

  std::string description() const override {
    const cuda::DeviceFacts &f = context->facts();
    char text[256];
    std::snprintf(text, sizeof text, "cuda: %s (sm_%d, %d SMs, %.1f GiB, driver %d.%d, runtime %d.%d)", f.name.c_str(),
                  f.computeCapability, f.multiprocessors, static_cast<double>(f.totalMemory) / (1 << 30),
                  f.driverVersion / 1000, f.driverVersion % 1000 / 10, f.runtimeVersion / 1000,
                  f.runtimeVersion % 1000 / 10);
    return text;
  }

  Status upload(Matrix &matrix) override {
    if (matrix.device || matrix.empty())
      return Status::success();
    Expected<std::shared_ptr<const cuda::DeviceWeight>> weight = copyMatrix(matrix);
    if (!weight) {
      // --device auto: what does not fit stays on the CPU (slower, never a
      // failed run); --device cuda: the user asked for the GPU, say why not.
      if (lenient)
        return Status::success();
      return Status::error(weight.status().message(), " (run with --device cpu or auto, or a smaller --max-memory)");
    }
    if (*weight)
      matrix.device = std::make_shared<CudaMatrix>(shared_from_this(), weight.take());
    return Status::success();
  }

  void linear(const Matrix &weight, const float *x, int64_t tokens, float *y) override {
    const std::pair<const cuda::DeviceWeight *, float *> product{&deviceWeight(weight), y};
    record(context->multiply(x, tokens, weight.cols, &product, 1));
  }

  void linearTogether(const float *x, int64_t tokens, int64_t cols,
                      std::span<const std::pair<const Matrix *, float *>> products) override {
    thread_local std::vector<std::pair<const cuda::DeviceWeight *, float *>> jobs;
    jobs.clear();
    for (const auto &[matrix, y] : products)
      jobs.emplace_back(&deviceWeight(*matrix), y);
    record(context->multiply(x, tokens, cols, jobs.data(), jobs.size()));
  }

  void experts(std::span<const std::pair<const MlpWeights *, float>> mlps, const float *x, int64_t hidden,
               float *out) override {
    thread_local std::vector<cuda::ExpertProduct> jobs;
    jobs.clear();
    for (const auto &[mlp, weight] : mlps)
      jobs.push_back({&deviceWeight(mlp->gate), &deviceWeight(mlp->up), &deviceWeight(mlp->down), weight});
    record(context->experts(x, hidden, jobs.data(), jobs.size(), out));
  }

  void routedExperts(std::span<const DeviceRoutedExpert> experts, const float *x, int64_t tokens, int64_t hidden,
                     float *out) override {
    thread_local std::vector<cuda::RoutedExpertTokens> jobs;
    jobs.clear();
    for (const DeviceRoutedExpert &e : experts)
      jobs.push_back({&deviceWeight(e.mlp->gate), &deviceWeight(e.mlp->up), &deviceWeight(e.mlp->down), e.tokens,
                      e.weights, e.count});
    record(context->routedExperts(x, tokens, hidden, jobs.data(), jobs.size(), out));
  }

  bool decodesOnDevice() const override { return true; }

  bool holdsAttention(const LayerWeights &w) const override {
    if (!w.deviceVectors || !w.output.device)
      return false;
    if (w.kvDown.empty()) // grouped-query attention
      return w.query.device && w.key.device && w.value.device;
    // Multi-head latent attention, with or without a query low-rank projection.
    const auto &v = *static_cast<const CudaVectors *>(w.deviceVectors.get());
    return (w.query.device || (w.queryDown.device && w.queryUp.device && v.queryDownNorm)) && w.kvDown.device &&
           w.kvUp.device && v.kvDownNorm;
  }

  bool holdsRouter(const LayerWeights &w) const override {
    return w.deviceVectors && static_cast<const CudaVectors *>(w.deviceVectors.get())->router;
  }

  bool routesOnDevice(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &w) override {
    if (!routeOnDevice || layer.mlp != MlpKind::Moe || !holdsRouter(w) || !deviceHoldsExperts(layer, w))
      return false;
    const auto &v = *static_cast<const CudaVectors *>(w.deviceVectors.get());
    if (!v.routedTried) {
      v.routedTried = true;
      cuda::RoutedLayerDescription d;
      const RouterSpec &router = w.routing.router ? *w.routing.router : spec.router;
      d.router = router::params(router, w.router.rows);
      d.skipThreshold = w.routing.skipThreshold;
      d.correctionBias = w.routerCorrectionBias.empty() ? nullptr : w.routerCorrectionBias.data();
      if (!w.routing.remap.empty()) {
        if (static_cast<int64_t>(w.routing.remap.size()) != w.router.rows)
          return false;
        d.remap = w.routing.remap.data();
      }
      for (const MlpWeights &e : w.experts)
        d.experts.push_back({&deviceWeight(e.gate), &deviceWeight(e.up), &deviceWeight(e.down), 0.0f});
      cuda::ExpertProduct shared;
      if (layer.shared.intermediateSize > 0) {
        shared = {&deviceWeight(w.shared.gate), &deviceWeight(w.shared.up), &deviceWeight(w.shared.down), 0.0f};
        d.shared = &shared;
        if (layer.shared.gated) {
          if (static_cast<int64_t>(w.sharedExpertGate.size()) != spec.hiddenSize)
            return false;
          d.sharedGate = w.sharedExpertGate.data();
        }
      }
      d.hidden = spec.hiddenSize;
      // What the kernel cannot route (more rows or experts a token than it
      // holds) routes on the host, as before; so does a layer the device
      // had no memory for under --device auto.
      Expected<std::shared_ptr<const cuda::RoutedLayerHandle>> handle = context->prepareRouted(d);
      if (handle)
        v.routed = handle.take();
      else if (!lenient)
        record(handle.status());
    }
    // A failed allocation since (another layer's) leaves no room: the host.
    return v.routed && context->routedReady(*v.routed);
  }

  int64_t routedLayers() const override { return static_cast<int64_t>(layersRouted.size()); }
  DeviceGraphStats graphStats() const override {
    const cuda::GraphStats g = context->graphStats();
    return {g.captures, g.replays, g.failures, g.firstFailure, g.tokenGraphs, g.tokenReplays, g.tokenFailures};
  }

  Status decodeRoutedMlp(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &w) override {
    if (!routesOnDevice(spec, layer, w) || stepTokens != 1)
      return Status::error("CUDA decode: layer ", layer.index, " is not routed on the device");
    MOE_RETURN_IF_ERROR(context->decodeRouted(*static_cast<const CudaVectors *>(w.deviceVectors.get())->routed));
    layersRouted.insert(layer.index);
    return Status::success();
  }

  Status decodeBegin(const float *x, int64_t hidden, int64_t tokens, bool layersStay) override {
    appended.clear();
    tokenCache = nullptr;
    stepTokens = tokens;
    return context->decodeBegin(x, hidden, tokens, layersStay);
  }

  bool prefillsOnDevice() const override { return prefillOnDevice; }

  Status choosePrefill(std::string_view name) override {
    if (name != "device" && name != "host")
      return Status::error("unknown prefill '", name, "' (device or host)");
    prefillOnDevice = name == "device";
    return Status::success();
  }

  void decodeAbandon() override {
    context->decodeDiscard();
    for (const auto &[rows, size] : appended)
      rows->resize(size);
    appended.clear();
    // The mirror holds the failed token's rows in the layers that ran: the
    // next decode uploads the host's rows again.
    if (tokenCache)
      tokenCache->device.reset();
    error = Status::success();
  }

  Status chooseRouting(std::string_view name) override {
    if (name != "device" && name != "device-eager" && name != "host")
      return Status::error("unknown routing '", name, "' (device, device-eager or host)");
    routeOnDevice = name != "host";
    context->setGraphs(name != "device-eager");
    return Status::success();
  }
  Status chooseGraphs(std::string_view name) override {
    if (name != "token" && name != "layer")
      return Status::error("unknown CUDA graphs '", name, "' (token or layer)");
    context->setTokenGraphs(name == "token");
    return Status::success();
  }

  Status decodeAttention(const ModelSpec &spec, const LayerWeights &w, int64_t index, const float *cos,
                         const float *sin, int64_t ropeHalf, KvCache &cache, float *mlpInput,
                         float *routerLogits) override {
    if (!holdsAttention(w))
      return Status::error("CUDA decode: layer ", index, "'s attention is not on the device");
    const AttentionSpec &a = spec.attention;
    const auto &v = *static_cast<const CudaVectors *>(w.deviceVectors.get());
    tokenCache = &cache;
    if (!cache.device)
      cache.device = context->newKvMirror(spec.numLayers);
    auto &mirror = *static_cast<cuda::KvMirror *>(cache.device.get());
    const int64_t keyWidth = a.numKeyValueHeads * a.headDim, valueWidth = a.numKeyValueHeads * a.valueHeadDim;
    std::vector<float> &keys = cache.keys[static_cast<size_t>(index)],
                       &values = cache.values[static_cast<size_t>(index)];
    const int64_t rows = static_cast<int64_t>(keys.size()) / keyWidth;
    if (rows != cache.length)
      return Status::error("CUDA decode: layer ", index, " caches ", rows, " positions, not ", cache.length);
    const int64_t T = stepTokens;
    MOE_RETURN_IF_ERROR(
        context->decodeSyncCache(mirror, index, keys.data(), values.data(), rows, keyWidth, valueWidth, T));
    cuda::DecodeAttention d;
    d.attentionNorm = v.attentionNorm;
    d.attentionNormBias = v.attentionNormBias;
    d.mlpNorm = v.mlpNorm;
    d.mlpNormBias = v.mlpNormBias;
    d.layerNorm = spec.normKind == NormKind::LayerNorm;
    d.eps = static_cast<float>(spec.normEps);
    auto held = [](const Matrix &m) { return m.device ? &deviceWeight(m) : nullptr; };
    d.query = held(w.query);
    d.key = held(w.key);
    d.value = held(w.value);
    d.output = held(w.output);
    if (a.kind == AttentionKind::MultiHeadLatent) {
      d.latent = true;
      d.queryDown = held(w.queryDown);
      d.queryUp = held(w.queryUp);
      d.kvDown = held(w.kvDown);
      d.kvUp = held(w.kvUp);
      d.queryDownNorm = v.queryDownNorm;
      d.kvDownNorm = v.kvDownNorm;
      d.kvLora = static_cast<int>(a.kvLoraRank);
      d.nopeDim = static_cast<int>(a.qkNopeHeadDim);
      d.ropeDim = static_cast<int>(a.qkRopeHeadDim);
    }
    d.queryBias = v.queryBias;
    d.keyBias = v.keyBias;
    d.valueBias = v.valueBias;
    d.outputBias = v.outputBias;
    d.queryNorm = v.queryNorm;
    d.keyNorm = v.keyNorm;
    d.qkNorm = a.qkNorm == QkNormKind::PerHead ? 1 : a.qkNorm == QkNormKind::FullWidth ? 2 : 0;
    d.clip = static_cast<float>(a.clipQkv);
    d.heads = static_cast<int>(a.numHeads);
    d.kvHeads = static_cast<int>(a.numKeyValueHeads);
    d.headDim = static_cast<int>(a.headDim);
    d.valueDim = static_cast<int>(a.valueHeadDim);
    d.ropeHalf = static_cast<int>(ropeHalf);
    d.ropeInterleaved = spec.rope.layout == RopeLayout::Interleaved;
    d.cos = cos;
    d.sin = sin;
    d.softmaxScale = static_cast<float>(a.softmaxScale);
    d.router = v.router;
    if (routerLogits && !v.router)
      return Status::error("CUDA decode: layer ", index, "'s router is not on the device");
    for (std::vector<float> *rowsOf : {&keys, &values})
      appended.emplace_back(rowsOf, rowsOf->size());
    if (!mlpInput) {
      if (T != 1)
        return Status::error("CUDA decode: the MLP of a step of ", T, " tokens goes to the host");
      // The MLP stays on the device: the rows arrive at the token's last
      // wait, in place (these vectors are not touched before it).
      keys.resize(keys.size() + static_cast<size_t>(keyWidth));
      values.resize(values.size() + static_cast<size_t>(valueWidth));
      if (!v.attentionGraph)
        v.attentionGraph = context->newDecodeGraph();
      return context->decodeAttention(d, mirror, index, cache.length, nullptr, keys.data() + rows * keyWidth,
                                      values.data() + rows * valueWidth, nullptr, v.attentionGraph.get());
    }
    thread_local std::vector<float> keyRow, valueRow;
    keyRow.resize(static_cast<size_t>(T * keyWidth));
    valueRow.resize(static_cast<size_t>(T * valueWidth));
    MOE_RETURN_IF_ERROR(context->decodeAttention(d, mirror, index, cache.length, mlpInput, keyRow.data(),
                                                 valueRow.data(), routerLogits));
    keys.insert(keys.end(), keyRow.begin(), keyRow.end());
    values.insert(values.end(), valueRow.begin(), valueRow.end());
    return Status::success();
  }

  Status decodeMlp(std::span<const std::pair<const MlpWeights *, float>> mlps, bool everyToken) override {
    if (stepTokens != 1)
      return Status::error("CUDA decode: one token's MLPs in a step of ", stepTokens, " tokens");
    if (!std::all_of(mlps.begin(), mlps.end(), [](const auto &mlp) { return deviceHolds(*mlp.first); }))
      return Status::error("CUDA decode: an MLP is not on the device");
    thread_local std::vector<cuda::ExpertProduct> jobs;
    jobs.clear();
    for (const auto &[mlp, weight] : mlps)
      jobs.push_back({&deviceWeight(mlp->gate), &deviceWeight(mlp->up), &deviceWeight(mlp->down), weight});
    // A dense layer's MLP replays as a graph, kept with its gate matrix.
    cuda::DecodeGraph *graph = nullptr;
    if (everyToken && mlps.size() == 1) {
      const auto &gate = static_cast<const CudaMatrix &>(*mlps.front().first->gate.device);
      if (!gate.mlpGraph)
        gate.mlpGraph = context->newDecodeGraph();
      graph = gate.mlpGraph.get();
    }
    return context->decodeExperts(jobs.data(), jobs.size(), graph);
  }

  Status decodeRoutedBlock(std::span<const DeviceRoutedExpert> mlps) override {
    thread_local std::vector<cuda::RoutedExpertTokens> jobs;
    jobs.clear();
    for (const DeviceRoutedExpert &e : mlps) {
      if (!deviceHolds(*e.mlp))
        return Status::error("CUDA decode: an MLP is not on the device");
      jobs.push_back({&deviceWeight(e.mlp->gate), &deviceWeight(e.mlp->up), &deviceWeight(e.mlp->down), e.tokens,
                      e.weights, e.count});
    }
    return context->decodeRoutedExperts(jobs.data(), jobs.size());
  }

  Status decodeAddBranch(const float *branch) override { return context->decodeAddBranch(branch); }

  Status decodeEnd(const ModelSpec &spec, const GlobalWeights &globals, float *logits, int64_t &expertCalls,
                   int64_t rows) override {
    const Matrix &head = globals.outputProjection();
    if (!head.device || !globals.deviceVectors)
      return Status::error("CUDA decode: the output projection is not on the device");
    const auto &v = *static_cast<const CudaVectors *>(globals.deviceVectors.get());
    if (!v.endGraph)
      v.endGraph = context->newDecodeGraph();
    MOE_RETURN_IF_ERROR(context->decodeEnd(v.finalNorm, v.finalNormBias, spec.normKind == NormKind::LayerNorm,
                                           static_cast<float>(spec.normEps), deviceWeight(head), v.lmHeadBias, logits,
                                           &expertCalls, rows, v.endGraph.get()));
    appended.clear();
    tokenCache = nullptr;
    return Status::success();
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
  Status chooseProductKernel(std::string_view name) override {
    if (name == "auto" || name == "dp4a")
      context->setProductKernel(cuda::ProductKernel::Auto);
    else if (name == "streamed")
      context->setProductKernel(cuda::ProductKernel::Streamed);
    else if (name == "warp-per-row")
      context->setProductKernel(cuda::ProductKernel::WarpPerRow);
    else
      return Status::error("unknown CUDA product kernel '", name, "' (auto, streamed, warp-per-row or dp4a)");
    context->setTensorCores(name != "dp4a");
    return Status::success();
  }
  Status chooseLaunches(std::string_view name) override {
    if (name != "dependent" && name != "plain")
      return Status::error("unknown CUDA launches '", name, "' (dependent or plain)");
    context->setDependentLaunches(name == "dependent");
    return Status::success();
  }
  Status chooseMoeKernels(std::string_view name) override {
    if (name != "fused" && name != "apart")
      return Status::error("unknown CUDA MoE kernels '", name, "' (fused or apart)");
    context->setFusedMoe(name == "fused");
    return Status::success();
  }
  Status chooseAttentionSplits(int64_t most) override {
    if (most < 0 || most > cuda::kMaxAttentionSplits)
      return Status::error("CUDA attention splits ", most, ": expected 0 (as the device calls for) to ",
                           cuda::kMaxAttentionSplits);
    context->setAttentionSplits(static_cast<int>(most));
    return Status::success();
  }

protected:
  Status uploadVectors(LayerWeights &w) override {
    auto vectors = std::make_shared<CudaVectors>();
    Status status = Status::success();
    for (auto [host, device] : {std::pair{&w.attentionNorm, &vectors->attentionNorm},
                                {&w.attentionNormBias, &vectors->attentionNormBias},
                                {&w.mlpNorm, &vectors->mlpNorm},
                                {&w.mlpNormBias, &vectors->mlpNormBias},
                                {&w.queryBias, &vectors->queryBias},
                                {&w.keyBias, &vectors->keyBias},
                                {&w.valueBias, &vectors->valueBias},
                                {&w.outputBias, &vectors->outputBias},
                                {&w.queryNorm, &vectors->queryNorm},
                                {&w.keyNorm, &vectors->keyNorm},
                                {&w.queryDownNorm, &vectors->queryDownNorm},
                                {&w.kvDownNorm, &vectors->kvDownNorm}})
      if (status.ok())
        status = copy(*vectors, *host, *device);
    // The router, for decode alone (decodeAttention hands its logits back
    // with the MLP input); prefill routes with the CPU's products. Without
    // room for it the host computes the logits, as before: no error.
    if (status.ok() && !w.router.empty())
      if (Expected<std::shared_ptr<const cuda::DeviceWeight>> router = copyMatrix(w.router); router && *router) {
        vectors->router = router->get();
        vectors->held.push_back(router.take());
      }
    // Without its vectors a layer decodes through the products alone.
    if (!status.ok())
      return lenient ? Status::success() : status;
    w.deviceVectors = std::move(vectors);
    return Status::success();
  }
  Status uploadVectors(GlobalWeights &globals) override {
    auto vectors = std::make_shared<CudaVectors>();
    Status status = Status::success();
    for (auto [host, device] : {std::pair{&globals.finalNorm, &vectors->finalNorm},
                                {&globals.finalNormBias, &vectors->finalNormBias},
                                {&globals.lmHeadBias, &vectors->lmHeadBias}})
      if (status.ok())
        status = copy(*vectors, *host, *device);
    if (!status.ok())
      return lenient ? Status::success() : status;
    globals.deviceVectors = std::move(vectors);
    return Status::success();
  }

private:
  /// A device copy of `matrix`, or null for formats the device has no
  /// kernel for (K-quants and Q5_*: the CPU's kernels).
  Expected<std::shared_ptr<const cuda::DeviceWeight>> copyMatrix(const Matrix &matrix) {
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
      return std::shared_ptr<const cuda::DeviceWeight>();
    } else if (matrix.isBf16()) {
      layout = cuda::WeightLayout::BF16;
      data = matrix.bf16.data();
      bytes = matrix.bf16.size() * sizeof(uint16_t);
    } else {
      layout = cuda::WeightLayout::F32;
      data = matrix.data.data();
      bytes = matrix.data.size() * sizeof(float);
    }
    return context->upload(layout, format, signedCodes, matrix.rows, matrix.cols, data, bytes);
  }

  Status copy(CudaVectors &vectors, const std::vector<float> &host, const float *&device) {
    if (host.empty())
      return Status::success();
    Expected<std::shared_ptr<const cuda::DeviceWeight>> copied =
        context->uploadVector(host.data(), static_cast<int64_t>(host.size()));
    if (!copied)
      return copied.status();
    device = static_cast<const float *>((*copied)->data);
    vectors.held.push_back(copied.take());
    return Status::success();
  }

  void record(Status status) {
    if (!status.ok() && error.ok())
      error = std::move(status);
  }

  std::shared_ptr<cuda::Context> context;
  bool lenient = false;
  bool routeOnDevice = true;      ///< chooseRouting.
  std::set<int64_t> layersRouted; ///< Layers whose MoE block the device has routed.
  KvCache *tokenCache = nullptr;  ///< The cache of the token being decoded.
  int64_t stepTokens = 1;         ///< decodeBegin's tokens.
  bool prefillOnDevice = false;   ///< choosePrefill.
  Status error = Status::success();
  /// The host cache's rows this token appended ahead of their values
  /// (vector, size before), which decodeAbandon takes back.
  std::vector<std::pair<std::vector<float> *, size_t>> appended;
};

} // namespace

Expected<std::shared_ptr<Device>> openCudaDevice(bool lenient) {
  Expected<std::shared_ptr<cuda::Context>> context = cuda::Context::open();
  if (!context)
    return Status::error("--device cuda: ", context.status().message());
  return std::shared_ptr<Device>(std::make_shared<CudaDevice>(context.take(), lenient));
}

} // namespace moe
