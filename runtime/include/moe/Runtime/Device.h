//===- Device.h - Where the engine's matrix products run --------*- C++ -*-===//
//
// Part of moec. The engine is one forward pass (DESIGN.md principle 2); a
// Device runs its matrix products elsewhere than the CPU. When the engine
// has one, every matrix a layer loads (attention, dense and shared MLPs,
// routed experts, split parts, lm_head) is copied to device memory once,
// in its stored format, and `kernels::linear`, the decode of q/k/v together,
// a token's experts and a MoE block's prefill run there. A device that
// decodes with the residual stream on it (decodesOnDevice) also runs a
// token's norms, RoPE, attention and a mirror of the KV cache, and routes
// the MoE layers it holds whole (routesOnDevice), so that a token of such
// layers waits for the device once, for its logits. Matrices without a
// device kernel (ggml's K-quants and Q5_*) and experts an expert cache
// loads on demand stay on the CPU, and their layers route on the host.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_DEVICE_H
#define MOE_RUNTIME_DEVICE_H

#include "moe/Support/Status.h"

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>

namespace moe {

struct Matrix;
struct MlpWeights;
struct ModelSpec;
struct KvCache;
struct LayerSpec;
struct LayerWeights;
struct GlobalWeights;
class Device;

/// A matrix's copy in device memory (Matrix::device), owned by its Device.
class DeviceMatrix {
public:
  virtual ~DeviceMatrix() = default;
  virtual Device &device() const = 0;
};

/// One routed expert of a MoE block over a block of tokens: the tokens
/// routed to it (rows of the block's input) and their routing weights.
struct DeviceRoutedExpert {
  const MlpWeights *mlp = nullptr;
  const int32_t *tokens = nullptr;
  const float *weights = nullptr;
  int64_t count = 0;
};

/// How a device's decode graphs went (CUDA: per-layer graphs of launches).
struct DeviceGraphStats {
  int64_t captures = 0, replays = 0, failures = 0;
  std::string firstFailure; ///< Why the first failure failed (of either kind); empty if none.
  /// Tokens' graphs (Device::chooseGraphs) built, launched and failed.
  int64_t tokenGraphs = 0, tokenReplays = 0, tokenFailures = 0;
};

/// Runs matrix products on an accelerator. Calls come from one host thread
/// at a time. A product that fails leaves its output undefined and records
/// the error, which the engine collects with takeError() after each layer.
class Device : public std::enable_shared_from_this<Device> {
public:
  virtual ~Device() = default;
  /// "cuda: NVIDIA H200 (sm_90, 139.8 GiB, driver 13.0)".
  virtual std::string description() const = 0;
  /// Copies `matrix` to the device and sets matrix.device; leaves it on the
  /// CPU (no error) when the device has no kernel for its format.
  virtual Status upload(Matrix &matrix) = 0;
  /// y[T, rows] = x[T, cols] W^T (no bias); host buffers.
  virtual void linear(const Matrix &weight, const float *x, int64_t tokens, float *y) = 0;
  /// Several matrices that read the same x[tokens, cols] (no bias): one
  /// crossing of x and of the results for all of them.
  virtual void linearTogether(const float *x, int64_t tokens, int64_t cols,
                              std::span<const std::pair<const Matrix *, float *>> products) = 0;
  /// out[H] = sum_i weight_i * mlp_i(x) over one token's experts (no split
  /// parts), added in order.
  virtual void experts(std::span<const std::pair<const MlpWeights *, float>> mlps, const float *x, int64_t hidden,
                       float *out) = 0;
  /// A MoE block's routed experts (no split parts) over x[tokens, H]:
  /// out[t] = sum of weight * mlp(x_t) over the experts t is routed to, in
  /// the given order, added from zero as the CPU engine adds them (a
  /// prefill's block in one call).
  virtual void routedExperts(std::span<const DeviceRoutedExpert> experts, const float *x, int64_t tokens,
                             int64_t hidden, float *out) = 0;
  /// The first error since the last call, then clear.
  virtual Status takeError() = 0;
  /// Bytes of matrices in device memory now.
  virtual size_t residentBytes() const = 0;
  /// Seconds the device spent (transfers included) since the last reset.
  virtual double busySeconds() const = 0;
  virtual void resetBusySeconds() = 0;
  /// Device-to-device copy bandwidth (bytes read + written per second).
  virtual Expected<double> copyBandwidth() = 0;
  /// Benchmarks: the kernel of one token's products by name (CUDA: "auto",
  /// the default, "streamed" or "warp-per-row"; "dp4a": "auto", and
  /// products of many tokens without tensor cores); an error for a name
  /// the device does not know.
  virtual Status chooseProductKernel(std::string_view name);
  /// Benchmarks and tests: how the device's kernels follow each other
  /// (CUDA: "dependent", the default, where each kernel's blocks start
  /// while the one before drains, on sm_90 and later; "plain", each kernel
  /// after the last has ended); the same results either way. An error for
  /// other names; "dependent" where the device lacks it is "plain".
  virtual Status chooseLaunches(std::string_view name);
  /// Benchmarks and tests: the kernels of a decoded token's MoE block
  /// routed on the device (CUDA: "fused", the default, three: routing,
  /// gate and up with SwiGLU, down with the weighted sum; "apart", five:
  /// SwiGLU and the sum launched on their own); the same results either
  /// way. An error for other names or a device that does not route.
  virtual Status chooseMoeKernels(std::string_view name);
  /// Benchmarks and tests: the most blocks one head's decode attention is
  /// split over (CUDA: 0, the default, as the device's multiprocessors call
  /// for; 1, a block a head; at most 64), the same results but for the
  /// order of float additions. An error for a count out of range or a
  /// device that has no such choice.
  virtual Status chooseAttentionSplits(int64_t most);
  /// Benchmarks and tests: what a decoded token's graphs are (CUDA:
  /// "token", the default, one graph of the whole token where its layers
  /// stay loaded; "layer", a graph per layer's attention and MLP, launched
  /// one by one), the same kernels either way. chooseRouting's
  /// "device-eager" uses no graphs at all. An error for other names or a
  /// device without graphs.
  virtual Status chooseGraphs(std::string_view name);

  // Decode of one token with the residual stream on the device (grouped-
  // query or latent attention): the engine calls decodeBegin, then per
  // layer decodeAttention and the MLP, then decodeEnd. Where the MLP stays
  // on the device (a dense MLP it holds, or a MoE block it routes:
  // routesOnDevice), decodeAttention hands nothing back (mlpInput null) and
  // decodeMlp or decodeRoutedMlp follows, without a wait. Else
  // decodeAttention hands back the MLP input, and the router's logits of it
  // where the device holds the router, for routing on the host, and
  // decodeMlp or decodeAddBranch follows. The token's keys and values reach
  // the host cache too (by decodeEnd). After a failed step the engine calls
  // decodeAbandon. Devices without it answer false to decodesOnDevice and
  // the engine uses the products above.
  //
  // A prompt can take the same path a chunk of tokens at a time
  // (prefillsOnDevice; decodeBegin with several tokens): each layer hands
  // the MLP input and the router's logits of every token back, the host
  // routes them, and decodeRoutedBlock runs the block on the device (or
  // decodeAddBranch adds what the host computed); decodeEnd gives the last
  // rows' logits.
  virtual bool decodesOnDevice() const { return false; }
  /// Whether prompts take the decode path (choosePrefill), not the
  /// products above.
  virtual bool prefillsOnDevice() const { return false; }
  /// Whether the device holds all that decodeAttention reads of `layer`.
  virtual bool holdsAttention(const LayerWeights &layer) const { return false; }
  /// Whether decodeAttention can hand back `layer`'s router logits.
  virtual bool holdsRouter(const LayerWeights &layer) const { return false; }
  /// x[tokens, hidden]: the step's tokens, at consecutive positions.
  /// `layersStay`: every layer the step runs stays loaded until decodeEnd
  /// (none is freed in between), so the device may run the step's work as
  /// one unit at its end (CUDA: the token's graph).
  virtual Status decodeBegin(const float *x, int64_t hidden, int64_t tokens = 1, bool layersStay = false);
  /// Whether the device routes `layer`'s MoE block itself: it holds the
  /// router, every expert and the shared expert, and its routing kernel
  /// takes the router (rows, top-k). Decided once per layer.
  virtual bool routesOnDevice(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &weights) {
    return false;
  }
  /// cos, sin: [tokens, ropeHalf]. mlpInput: [tokens, hidden] for the MLP
  /// input, or null when the MLP stays on the device (one token only);
  /// routerLogits: null, or [tokens, router rows] for the router's logits
  /// of the MLP input (holdsRouter, with mlpInput only).
  virtual Status decodeAttention(const ModelSpec &spec, const LayerWeights &layer, int64_t index, const float *cos,
                                 const float *sin, int64_t ropeHalf, KvCache &cache, float *mlpInput,
                                 float *routerLogits);
  /// Layers whose MoE block the device has routed itself so far
  /// (decodeRoutedMlp): benchmarks report it, tests check it.
  virtual int64_t routedLayers() const { return 0; }
  /// Captures, replays and failures of decode graphs so far.
  virtual DeviceGraphStats graphStats() const { return {}; }
  /// Residual += the MoE block of the MLP input the last decodeAttention
  /// kept, routed on the device (routesOnDevice).
  virtual Status decodeRoutedMlp(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &weights);
  /// Residual += sum_i weight_i * mlp_i(MLP input), for MLPs the device
  /// holds. `everyToken`: the same MLPs and weights at every token (a dense
  /// layer), which a device may replay as it recorded them.
  virtual Status decodeMlp(std::span<const std::pair<const MlpWeights *, float>> mlps, bool everyToken = false);
  /// Residual += a block over the step's tokens that the host routed, for
  /// MLPs the device holds: each one's tokens and weights (a dense MLP: all
  /// tokens, weight 1; a shared expert: all tokens, its gate), added as the
  /// engine adds a MoE block (zero, then MLP after MLP), then onto the
  /// residual.
  virtual Status decodeRoutedBlock(std::span<const DeviceRoutedExpert> mlps);
  /// Residual += branch[tokens, hidden] (host).
  virtual Status decodeAddBranch(const float *branch);
  /// The last `rows` tokens' logits [rows, vocabulary]; expertCalls: the
  /// routed experts decodeRoutedMlp ran this token (the engine's counters).
  virtual Status decodeEnd(const ModelSpec &spec, const GlobalWeights &globals, float *logits, int64_t &expertCalls,
                           int64_t rows = 1);
  /// After a failed step of a token: drops what the token left pending,
  /// and the key and value rows it appended to the host cache.
  virtual void decodeAbandon() {}
  /// Benchmarks and tests: where decode routes the MoE layers the device
  /// holds whole, "device" (the default) or "host" (each with the layers'
  /// launches replayed as CUDA graphs where they stay on the device), or
  /// "device-eager" (routing on the device, every launch one by one); an
  /// error for other names or a device that does not route.
  virtual Status chooseRouting(std::string_view name);
  /// Where prompts run: "host" (the default: products on the device, the
  /// rest on the host) or "device" (the decode path, a chunk of tokens at a
  /// time); an error for other names or a device that does not decode.
  virtual Status choosePrefill(std::string_view name);

  /// Uploads every matrix of a layer except the router (prefill routes on
  /// the host with the CPU's arithmetic; a device may keep a copy of its own
  /// for decode, holdsRouter).
  Status uploadLayer(LayerWeights &layer);
  /// Uploads the output projection (lm_head, or the tied embedding).
  Status uploadGlobals(GlobalWeights &globals);

protected:
  /// Copies a layer's (the model's) vectors, for decode on the device.
  virtual Status uploadVectors(LayerWeights &layer) { return Status::success(); }
  virtual Status uploadVectors(GlobalWeights &globals) { return Status::success(); }
};

/// Whether a device holds all of `mlp` (gate, up and down, no split parts):
/// what its expert calls need.
bool deviceHolds(const MlpWeights &mlp);
/// Whether a device holds every routed expert of a MoE layer and its shared
/// expert, if it has one (its router aside).
bool deviceHoldsExperts(const LayerSpec &layer, const LayerWeights &weights);

/// What `--device` names: cpu, cuda, or auto (cuda when this build has
/// CUDA and a device is usable, else cpu).
enum class DeviceChoice { Cpu, Cuda, Auto };
Expected<DeviceChoice> parseDeviceChoice(std::string_view name);

/// Whether this build has the CUDA device.
bool cudaBuilt();

/// The device for a choice: null for the CPU (and for auto without a usable
/// GPU); an error for cuda in a build without CUDA or without a device.
Expected<std::shared_ptr<Device>> openDevice(DeviceChoice choice);

/// How openDevice opens the CUDA device; `lenient` leaves a matrix the
/// device cannot hold on the CPU.
using CudaDeviceOpener = Expected<std::shared_ptr<Device>> (*)(bool lenient);
/// Replaces the build's CUDA device for the rest of the process (null
/// restores it): the GPU tests install the CUDA code's CPU emulation
/// (kernels/cuda/emulation) with it, on machines without a GPU. Returns
/// the opener it replaces.
CudaDeviceOpener setCudaDeviceOpener(CudaDeviceOpener opener);

} // namespace moe

#endif // MOE_RUNTIME_DEVICE_H
