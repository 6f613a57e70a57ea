//===- MatrixProducts.h - Matrix products of the engine on a GPU -*- C++ -*-===//
//
// Part of moec. A CUDA context that holds matrices in device memory in the
// layouts of kernels/common (f32, bf16, moec's group formats and ggml's
// Q4_0/Q4_1/Q8_0, which are the same bytes) and computes the engine's
// matrix products on them from host activations:
//   - `multiply`: several matrices that read the same input, T tokens;
//   - `experts`: one token's SwiGLU experts, weighted and summed.
// Group formats run as the CPU kernels do: the activation is rounded to
// int8 per weight group with the CPU's arithmetic (the same int8 values and
// scales), the codes are dotted in int32 (dp4a) and each group adds
// scale * sum + min * (the group's activation sum), so results differ from
// the CPU engine's only in the order of float additions. Nothing here
// knows a model; the runtime's CUDA device (runtime/lib/CudaDevice.cpp)
// maps its weights onto these calls.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CUDA_MATRIXPRODUCTS_H
#define MOE_KERNELS_CUDA_MATRIXPRODUCTS_H

#include "common/QuantFormat.h"
#include "cuda/RoutedExperts.h"
#include "moe/Support/Status.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace moe::cuda {

/// The most blocks one head's decode attention is split over
/// (Context::setAttentionSplits).
constexpr int kMaxAttentionSplits = 64;

enum class WeightLayout : uint8_t { F32, BF16, Group };

/// A row-major [rows, cols] matrix in device memory.
struct DeviceWeight {
  WeightLayout layout = WeightLayout::F32;
  quant::QuantFormat format; ///< Group layout only.
  bool signedCodes = false;  ///< Group layout: ggml's Q8_0 (two's complement codes, no min).
  int64_t rows = 0, cols = 0;
  const void *data = nullptr; ///< Device memory; group formats as planes (common/GroupPlanes.h).
  size_t bytes = 0;           ///< Bytes held on the device.
};

/// One routed (or shared) expert of a token: y += weight * down(silu(gate x) * up x).
struct ExpertProduct {
  const DeviceWeight *gate = nullptr, *up = nullptr, *down = nullptr;
  float weight = 0.0f;
};

/// One routed expert of a MoE block over a block of tokens (prefill): the
/// tokens routed to it (rows of the block's x) and their routing weights,
/// host memory.
struct RoutedExpertTokens {
  const DeviceWeight *gate = nullptr, *up = nullptr, *down = nullptr;
  const int32_t *tokens = nullptr;
  const float *weights = nullptr;
  int64_t count = 0;
};

/// Keys and values of one KV cache on the device, per layer (Context::
/// newKvMirror); grown as tokens come.
struct KvMirror;

/// A layer's decode launches held as a CUDA graph (Context::newDecodeGraph,
/// decodeAttention).
struct DecodeGraph;

/// A MoE layer that decode routes on the device (Context::prepareRouted):
/// its RoutedLayer in device memory and its launches' bounds.
struct RoutedLayerHandle;

/// What prepareRouted copies of a MoE layer; host memory, except the
/// matrices, which are on the device already.
struct RoutedLayerDescription {
  routing::RouterParams router;
  double skipThreshold = 0;
  const float *correctionBias = nullptr; ///< [router.rows] or null.
  const int32_t *remap = nullptr;        ///< [router.rows] (router row -> slot) or null.
  std::vector<ExpertProduct> experts;    ///< Per slot (weights unused).
  const ExpertProduct *shared = nullptr; ///< The shared expert, or null.
  const float *sharedGate = nullptr;     ///< [hidden]: the shared expert's gate (Qwen2-MoE), or null.
  int64_t hidden = 0;
};

/// The attention half of a decoder layer for one token (grouped-query or
/// multi-head latent attention), every pointer device memory unless said
/// otherwise; null vectors are absent (no bias, no qk-norm).
struct DecodeAttention {
  const float *attentionNorm = nullptr, *attentionNormBias = nullptr, *mlpNorm = nullptr, *mlpNormBias = nullptr;
  bool layerNorm = false; ///< LayerNorm (with bias) instead of RMSNorm.
  float eps = 0;
  const DeviceWeight *query = nullptr, *key = nullptr, *value = nullptr, *output = nullptr;
  const float *queryBias = nullptr, *keyBias = nullptr, *valueBias = nullptr, *outputBias = nullptr;
  const float *queryNorm = nullptr, *keyNorm = nullptr;
  int qkNorm = 0; ///< 0 none, 1 RMSNorm per head, 2 over the full width.
  float clip = 0; ///< 0: no clamp.
  int heads = 0, kvHeads = 0, headDim = 0, valueDim = 0;
  int ropeHalf = 0; ///< Rotated pairs per head.
  bool ropeInterleaved = false;
  const float *cos = nullptr, *sin = nullptr; ///< Host, [ropeHalf] each, for this token.
  float softmaxScale = 1;
  /// The MoE router [experts, hidden], or null: decodeAttention hands its
  /// logits of the MLP input back with that input.
  const DeviceWeight *router = nullptr;
  /// Multi-head latent attention (DeepSeek), in place of key and value
  /// (and of query with a query low-rank projection): q from `query`, or
  /// from queryDown, its RMSNorm and queryUp; keys and values from kvDown,
  /// the RMSNorm of its first kvLora columns and kvUp; RoPE on the last
  /// ropeDim columns of each query head and on the shared rope columns of
  /// kvDown. The cache holds full keys [heads, nopeDim + ropeDim] (kvHeads =
  /// heads, headDim = nopeDim + ropeDim) and values [heads, valueDim].
  bool latent = false;
  const DeviceWeight *queryDown = nullptr, *queryUp = nullptr, *kvDown = nullptr, *kvUp = nullptr;
  const float *queryDownNorm = nullptr, *kvDownNorm = nullptr;
  int kvLora = 0, nopeDim = 0, ropeDim = 0;
};

/// How one token's products over group-format matrices run: Streamed
/// copies each warp's blocks ahead into shared memory with cp.async;
/// WarpPerRow loads them into registers (the kernel of several tokens, and
/// of f32/bf16 matrices, in any case); Auto (the default) streams launches
/// whose rows hold under 2 KiB of codes on average. All give the same bits.
enum class ProductKernel : uint8_t { Auto, Streamed, WarpPerRow };

/// Decode graphs so far (Context::setGraphs).
struct GraphStats {
  int64_t captures = 0, replays = 0, failures = 0;
  /// Tokens' graphs (Context::setTokenGraphs) built, launched (each stands
  /// for its per-layer graphs' replays, which `replays` counts too) and
  /// failed.
  int64_t tokenGraphs = 0, tokenReplays = 0, tokenFailures = 0;
  std::string firstFailure; ///< The first failure of either kind.
};

/// The device's copy bandwidth and what a kernel read, for benchmarks.
struct DeviceFacts {
  std::string name;
  int computeCapability = 0; ///< 90 for sm_90.
  size_t totalMemory = 0;
  int multiprocessors = 0;
  int driverVersion = 0, runtimeVersion = 0;
};

/// A device, its stream and its scratch buffers. Calls are serialised by a
/// mutex. multiply, experts, routedExperts, decodeAttention (handing the
/// MLP input back) and decodeEnd return once their results are in host
/// memory; decodeBegin, decodeAttention (keeping the MLP on the device),
/// decodeExperts, decodeRouted and decodeAddBranch only enqueue (the
/// stream keeps them in order).
class Context {
public:
  /// Device 0; an error when the build has no usable device or driver.
  static Expected<std::shared_ptr<Context>> open();
  ~Context();
  Context(const Context &) = delete;
  Context &operator=(const Context &) = delete;

  const DeviceFacts &facts() const;

  /// Copies a matrix of `bytes` bytes from host memory (group formats split
  /// into planes, common/GroupPlanes.h); freed when the returned pointer is
  /// released. Checks that the bytes match the shape.
  Expected<std::shared_ptr<const DeviceWeight>> upload(WeightLayout layout, const quant::QuantFormat &format,
                                                       bool signedCodes, int64_t rows, int64_t cols, const void *host,
                                                       size_t bytes);

  /// For each of `count` (W, y): y[T, W.rows] = x[T, cols] W^T; x and every y are host
  /// memory, every W has `cols` columns.
  Status multiply(const float *x, int64_t tokens, int64_t cols,
                  const std::pair<const DeviceWeight *, float *> *products, size_t count);

  /// out[H] = sum_i weight_i * down_i(silu(gate_i x) * up_i x) over `count` experts of one token
  /// x[H] (host memory), the experts' outputs added in the given order.
  Status experts(const float *x, int64_t hidden, const ExpertProduct *experts, size_t count, float *out);

  /// A MoE block's routed experts over a block of tokens (prefill):
  /// out[t] = the sum, over the experts t is routed to in the given order,
  /// of weight * down(silu(gate x_t) * up x_t), added from zero in that
  /// order (the CPU engine's addRoutedOutputs, bit for bit); x and out are
  /// host memory [tokens, hidden]. One transfer each way: the gather of each
  /// expert's tokens, its products and the weighted sums run on the device.
  Status routedExperts(const float *x, int64_t tokens, int64_t hidden, const RoutedExpertTokens *experts, size_t count,
                       float *out);

  // Decode of one token with the residual stream on the device: a wait
  // for the logits, and one per layer whose MLP input goes to the host
  // (whose router chooses the experts, or which runs the MLP itself).
  // Layers whose MLP stays on the device (decodeExperts, or decodeRouted,
  // which routes there) cost no wait: a token of such layers is one wait.

  /// A vector (norm weights, biases) in device memory, F32 layout, 1 row.
  Expected<std::shared_ptr<const DeviceWeight>> uploadVector(const float *values, int64_t count);
  /// An empty mirror of a KV cache of `layers` layers.
  std::shared_ptr<KvMirror> newKvMirror(int64_t layers);
  /// The tokens x[tokens, hidden] (host) become the residual stream: one
  /// token (decode), or several at consecutive positions (a prompt's
  /// chunk), which every call until decodeEnd takes together.
  /// `layersStay`: every weight and graph the step's calls name lives until
  /// decodeEnd (or decodeDiscard), so that graph replays may wait for the
  /// token's graph (setTokenGraphs).
  Status decodeBegin(const float *x, int64_t hidden, int64_t tokens = 1, bool layersStay = false);
  /// Layer `layer` of `mirror` holds the host cache's first `rows` rows
  /// (uploading those it lacks) and room for `room` more.
  Status decodeSyncCache(KvMirror &mirror, int64_t layer, const float *keys, const float *values, int64_t rows,
                         int64_t keyWidth, int64_t valueWidth, int64_t room = 1);
  /// Norm, q/k/v (biases, qk-norm, clamp), RoPE, the cache append at rows
  /// `position` .. position + T - 1 (T: decodeBegin's tokens), causal
  /// attention over the rows up to each token, output projection and
  /// residual add, then the MLP's norm. `cos` and `sin` hold [T, ropeHalf].
  /// With `mlpInput`: waits, and gives the host the MLP input [T, hidden],
  /// the new key and value rows [T, width] and, when routerLogits is not
  /// null, the router's logits of the MLP input [T, layer.router->rows]. Without (the MLP stays on the device; then
  /// routerLogits is null): computes the router's logits on the device
  /// when the layer has a router (for decodeRouted), and writes keyRow and
  /// valueRow at the next wait (decodeEnd), so they must stay valid until
  /// then (decodeDiscard drops them). With `graph` (one per layer, and
  /// grouped-query attention whose MLP stays on the device), the layer's
  /// launches are captured as a CUDA graph at its second token and replayed
  /// at the next ones while what they read stays where it was.
  Status decodeAttention(const DecodeAttention &layer, KvMirror &mirror, int64_t layerIndex, int64_t position,
                         float *mlpInput, float *keyRow, float *valueRow, float *routerLogits = nullptr,
                         DecodeGraph *graph = nullptr);
  /// A graph holder for decodeAttention.
  std::shared_ptr<DecodeGraph> newDecodeGraph();
  /// Copies a MoE layer's routing (router settings, correction bias, remap
  /// table, dynamic-skip threshold) and its experts' product templates to
  /// the device. A null handle (and the reason in `why`) for a layer the
  /// device cannot route (more than kMaxRouterRows rows or kMaxRoutedTopK
  /// experts a token, shapes that do not fit), which the caller routes on
  /// the host instead; an error when the device fails (out of memory).
  Expected<std::shared_ptr<const RoutedLayerHandle>> prepareRouted(const RoutedLayerDescription &layer,
                                                                   std::string *why = nullptr);
  /// Whether decodeRouted can run `layer` now (false once a failed
  /// allocation has taken the routed scratch away: route on the host).
  bool routedReady(const RoutedLayerHandle &layer) const;
  /// Residual += the layer's MoE block of the MLP input that the last
  /// decodeAttention (without mlpInput) left on the device, routed on the
  /// device from the router's logits it computed: one routing kernel
  /// writes the job tables (RoutedExperts.h), six launches read them.
  Status decodeRouted(const RoutedLayerHandle &layer);
  /// After a failed step of a token: waits for the stream (ignoring its
  /// errors) and drops the copies to the host that decodeAttention left
  /// for the next wait.
  void decodeDiscard();
  /// Residual += sum_i weight_i * expert_i(MLP input), added in order (one
  /// token). With `graph`, for calls with the same experts and weights
  /// every token (a dense MLP), the launches run as a graph from the
  /// second call on.
  Status decodeExperts(const ExpertProduct *experts, size_t count, DecodeGraph *graph = nullptr);
  /// Residual += a MoE block (or dense MLP) over the step's tokens, routed
  /// by the host: each expert's tokens (indices into the step) gathered
  /// from the MLP input the last decodeAttention left on the device, their
  /// outputs weighted and added as routedExperts adds them (the engine's
  /// order: zero, then expert after expert), then onto the residual.
  Status decodeRoutedExperts(const RoutedExpertTokens *experts, size_t count);
  /// Residual += branch[T, hidden] (host): an MLP the host computed.
  Status decodeAddBranch(const float *branch);
  /// The final norm and the output projection (+ bias) of the step's last
  /// `rows` tokens: logits [rows, vocabulary] (host), waits; `expertCalls`
  /// (when not null) gets the routed experts decodeRouted ran since
  /// decodeBegin. With `graph` (the model's), one token's launches run as
  /// a graph from the second token on.
  Status decodeEnd(const float *norm, const float *normBias, bool layerNorm, float eps, const DeviceWeight &head,
                   const float *headBias, float *logits, int64_t *expertCalls = nullptr, int64_t rows = 1,
                   DecodeGraph *graph = nullptr);

  /// The kernel of one token's group-format products (benchmarks and
  /// tests compare them).
  void setProductKernel(ProductKernel kernel);
  /// Whether group-format products of tensor::kMinTokens tokens or more
  /// (prefill) run on the int8 tensor cores (TensorTiles.h; the default
  /// from sm_80) or on the dp4a kernel of several tokens; the same values
  /// but for the order of float additions. Ignored below sm_80.
  void setTensorCores(bool enabled);
  bool tensorCores() const;
  /// Whether decodeAttention and decodeRouted replay each layer's launches
  /// as CUDA graphs (the default) or launch them one by one; the same
  /// kernels either way.
  void setGraphs(bool graphs);
  /// Whether a token whose layers stay (decodeBegin's `layersStay`) runs
  /// its per-layer graphs as one graph of the token (the default), built
  /// the second time the same graphs come in the same order; the same
  /// kernels either way.
  void setTokenGraphs(bool enabled);
  GraphStats graphStats() const;
  /// Whether decode's kernels are programmatic dependent launches
  /// (cuda/Launch.h: each kernel's blocks start while the one before it
  /// drains; the default where the device, sm_90 or later, and the build
  /// have them) or wait for the kernel before them to end; the same
  /// results either way. Ignored where unsupported.
  void setDependentLaunches(bool enabled);
  /// Whether decodeRouted runs a token's MoE block as three kernels (the
  /// default: routing, gate and up with SwiGLU and its rounding, down with
  /// the weighted sum onto the residual stream, each fused step run by the
  /// warp that completes its inputs) or five (SwiGLU and the sum launches
  /// of their own); the same results either way.
  void setFusedMoe(bool enabled);
  /// The most blocks one head's decode attention is split over for one
  /// token (0, the default: about two blocks per multiprocessor over the
  /// step's heads, as steps of several tokens always take;
  /// at most kMaxAttentionSplits; runs of 64 positions or more each, so
  /// short contexts take one): the same results but for the order of
  /// float additions.
  void setAttentionSplits(int most);

  /// Bytes of matrices held now.
  size_t residentBytes() const;

  /// Device-to-device copy bandwidth over `bytes` (read + written bytes
  /// per second), the roofline a benchmark compares with.
  Expected<double> copyBandwidth(size_t bytes, int repeats);

  /// Seconds the device spent in the calls since the last reset (CUDA
  /// events around each call's launches).
  double kernelSeconds() const;
  void resetKernelSeconds();

  struct State;

private:
  Context() = default;
  std::unique_ptr<State> state;
};

} // namespace moe::cuda

#endif // MOE_KERNELS_CUDA_MATRIXPRODUCTS_H
