//===- Engine.h - The one forward pass of moec ------------------*- C++ -*-===//
//
// Part of moec. The only implementation of the transformer forward pass
// (DESIGN.md principle 2): every ModelSpec family, f32 compute, batched
// prefill through BLAS, MoE computed by grouping tokens per expert, a KV
// cache for generation, and observers for calibration.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_ENGINE_H
#define MOE_RUNTIME_ENGINE_H

#include "moe/Frontend/ModelSpec.h"
#include "moe/Runtime/Weights.h"

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <vector>

namespace moe {

/// Keys and values of the tokens seen so far, per layer. Rows are only
/// appended (the engine never cuts a cache back); a device's mirror of them
/// relies on that and counts rows.
struct KvCache {
  int64_t length = 0;
  /// Per layer, [length, keyWidth] and [length, valueWidth] row-major.
  std::vector<std::vector<float>> keys, values;
  /// A Device's mirror of these rows (decode on the device keeps both). A
  /// copy of the cache starts without one: two caches never share a mirror.
  std::shared_ptr<void> device;

  KvCache() = default;
  KvCache(const KvCache &other) : length(other.length), keys(other.keys), values(other.values) {}
  KvCache &operator=(const KvCache &other) {
    length = other.length;
    keys = other.keys;
    values = other.values;
    device.reset();
    return *this;
  }
  KvCache(KvCache &&) = default;
  KvCache &operator=(KvCache &&) = default;
};

/// Hooks the engine calls while it runs; calibration attaches one. Spans
/// are [tokens, width] row-major and valid only during the call.
class EngineObserver {
public:
  virtual ~EngineObserver() = default;
  /// Router logits [T, R] over the R router rows, per token the chosen rows
  /// and weights [T, K], and the expert slot of each row (`slotOfRow`;
  /// empty: row r is slot r). After merging, several rows share a slot;
  /// onExpert's `expert` is a slot.
  virtual void onRouter(int64_t layer, int64_t tokens, std::span<const float> logits, std::span<const int32_t> chosen,
                        std::span<const float> weights, std::span<const int32_t> slotOfRow) {}
  /// One expert's batch: the tokens routed to it (indices into the block
  /// input), its input [n, H], intermediate silu(gate)*up [n, I], output [n, H].
  virtual void onExpert(int64_t layer, int64_t expert, std::span<const int32_t> tokenIndices,
                        std::span<const float> input, std::span<const float> intermediate,
                        std::span<const float> output) {}
  /// The residual stream entering the MoE block (before its norm) and the
  /// routed experts' weighted output alone (shared experts not added), both
  /// [T, H]: EASY-EP's token contribution max(1 - cos(h, h + r), 0). Called
  /// before onMoeBlock, during the engine's forward pass and observeMoeBlock only.
  virtual void onMoeResidual(int64_t layer, int64_t tokens, std::span<const float> residual,
                             std::span<const float> routed) {}
  /// MoE block input (after the norm) and output (before the residual), [T, H].
  virtual void onMoeBlock(int64_t layer, int64_t tokens, std::span<const float> input, std::span<const float> output) {}
  /// Attention input (after the norm) [T, H] and the attended values that
  /// enter the output projection [T, heads * value dim].
  virtual void onAttention(int64_t layer, int64_t tokens, std::span<const float> input,
                           std::span<const float> attended) {}
  /// Shared expert input [T, H], its silu(gate)*up [T, width] and its
  /// down projection's output [T, H] (before its gate).
  virtual void onSharedExpert(int64_t layer, int64_t tokens, std::span<const float> input,
                              std::span<const float> intermediate, std::span<const float> output) {}
  /// Hidden state after layer `layer`, [T, H].
  virtual void onLayerOutput(int64_t layer, int64_t tokens, std::span<const float> hidden) {}
  /// When true, every routed expert also runs on every token of the block
  /// and onExpert sees all of them (for statistics of rarely routed
  /// experts); the block output still uses only the routed tokens.
  virtual bool computeAllExperts() const { return false; }
  /// When false for a routed expert slot, the block neither loads nor runs
  /// it: its onExpert call is not wanted, and the block output lacks its
  /// share. Calibration's replays of one layer for a chunk of experts'
  /// moments (CalibrationOptions::expertsPerChunk) read onExpert only.
  virtual bool runsExpert(int64_t layer, int64_t slot) const { return true; }
};

/// Hooks of the activation backward (Engine::lossGradients). Gradients are
/// of the window's mean next-token cross-entropy; spans are [tokens, width]
/// row-major and valid only during the call.
class GradientObserver {
public:
  virtual ~GradientObserver() = default;
  /// dL/d(output of layer `layer`'s MLP block: MoE block with its shared
  /// expert, or dense MLP), before the residual add; equal to dL/d(hidden
  /// state after the layer). Called from the last layer down.
  virtual void onBlockOutputGradient(int64_t layer, int64_t tokens, std::span<const float> gradient) {}
  /// One routed expert slot's tokens (indices into the block input), its
  /// intermediate silu(gate)*up [n, I] and dL/d(intermediate) [n, I]: the
  /// gradient at its down projection's input, routing weight included.
  virtual void onExpertGradient(int64_t layer, int64_t expert, std::span<const int32_t> tokenIndices,
                                std::span<const float> intermediate, std::span<const float> intermediateGradient) {}
  /// dL/d(embedding output), the input of layer 0, [T, H].
  virtual void onInputGradient(int64_t tokens, std::span<const float> gradient) {}
};

struct EngineOptions {
  /// Routed experts switched off, by layer: their router logits become
  /// -inf before routing, as if they were not in the model.
  std::map<int64_t, std::set<int64_t>> maskedExperts;
  /// Budget for converted layer weights; 0 means 3/4 of physical memory
  /// (the whole model when it fits).
  size_t maxMemoryBytes = 0;
  /// A package with nested bit widths loads some experts at their low bits
  /// so that its layer weights fit in this (chooseNestedPrecisions; `moec
  /// eval/generate --max-memory` sets it with maxMemoryBytes); 0: every
  /// expert at its high bits.
  size_t nestedBudgetBytes = 0;
  /// Expert offloading: when non-zero, layers are held without their
  /// routed experts (under maxMemoryBytes), and routed experts are loaded
  /// one by one on demand into an ExpertCache of this many bytes.
  size_t expertCacheBytes = 0;
  ExpertCachePolicy expertCachePolicy = ExpertCachePolicy::Lru;
  /// With an expert cache, HOBBIT's low-precision replacement
  /// (ExpertCache::buildFallbacks): every routed expert also kept in this
  /// format, used for a missing expert whose share of each of its tokens'
  /// routing weight is below expertFallbackBelow.
  std::optional<quant::QuantFormat> expertFallbackFormat;
  /// Or the low part of each expert's nested matrices (a package quantised
  /// with nested bit widths): no requantisation, and no second rounding.
  bool expertFallbackNested = false;
  double expertFallbackBelow = 0.5;
  /// False: the experts masked at creation are never loaded (a task set
  /// chosen at load, TaskSets.h), and setMaskedExperts refuses to unmask
  /// them. Layers with merged experts (a remap table) load every expert.
  bool loadMaskedExperts = true;
  /// Where matrix products run (Device.h; openDevice): null for the CPU.
  /// Every layer and the output projection are copied to it once loaded.
  std::shared_ptr<Device> device;
  /// On the CPU, lay group matrices out in row tiles at load where the
  /// kernels read those faster (makeRowTiles); false: the stored rows (for
  /// comparisons; the same values, summed in another order).
  bool rowTiles = true;
};

/// What the MoE layers did since the engine was made (or reset).
struct RoutingCounters {
  int64_t routedTokens = 0; ///< Tokens through MoE layers (counted once per layer).
  int64_t expertCalls = 0;  ///< (token, routed expert) pairs computed.
  double expertsPerToken() const {
    return routedTokens ? static_cast<double>(expertCalls) / static_cast<double>(routedTokens) : 0.0;
  }
};

/// What a MoE block computation reports to and is changed by.
struct MoeBlockHooks {
  const std::set<int64_t> *maskedRows = nullptr; ///< Router rows set to -inf.
  const float *residual = nullptr;               ///< [T, H] entering the block, for onMoeResidual.
  EngineObserver *observer = nullptr;
  RoutingCounters *counters = nullptr;
  /// Expert slots run with these weights instead of the layer's own (a
  /// search's candidate experts, Engine::setReplacedExperts).
  const std::map<int64_t, std::shared_ptr<const MlpWeights>> *replacedExperts = nullptr;
};

/// The routed MoE block (router, routed experts, shared expert) of `layer`
/// on x[tokens, H], writing out[tokens, H] (before the residual). This is
/// the engine's own computation; passes that measure block reconstruction
/// error (NAEE, dynamic skip) call it on cached block inputs.
void moeBlockForward(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &w, const float *x,
                     int64_t tokens, float *out, const MoeBlockHooks &hooks = {});

/// Adds the shared expert's output (gated for Qwen2-MoE) of x[tokens, H]
/// to out[tokens, H]; nothing when `layer` has no shared expert.
void addSharedExpert(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &w, const float *x,
                     int64_t tokens, float *out, EngineObserver *observer = nullptr);

/// Runs a model.
class Engine {
public:
  static Expected<std::unique_ptr<Engine>> create(const ModelSpec &spec, std::unique_ptr<WeightProvider> provider,
                                                  EngineOptions options = {});
  ~Engine();

  const ModelSpec &spec() const { return modelSpec; }
  KvCache newCache() const;

  /// Runs `tokens` at positions cache.length.. and appends them to the
  /// cache. `logits` receives [tokens.size(), vocab] (or only the last row
  /// when `lastOnly`).
  Status forward(std::span<const int32_t> tokens, KvCache &cache, std::vector<float> &logits, bool lastOnly = false);

  /// Layer at a time (calibration and sequential GPTQ run every window
  /// through one layer before the next, so one layer is resident at once):
  /// the embedding rows of `tokens` into x[tokens, H],
  Status embed(std::span<const int32_t> tokens, std::vector<float> &x) const;
  /// then layer `layer` on the residual stream x[tokens, H] in place, at
  /// positions cache.length.. (appending that layer's keys and values; the
  /// caller advances cache.length once every layer has run).
  /// With `moeInput`, the stream entering the layer's MLP block (after the
  /// attention's residual add, before the norm) is copied there [tokens, H].
  Status forwardLayer(int64_t layer, float *x, int64_t tokens, KvCache &cache, float *moeInput = nullptr);
  /// The MoE block of `layer` alone, exactly as forwardLayer runs it
  /// (masks, replaced experts, the expert cache, the observer), on the
  /// stream entering it, moeInput[tokens, H] as forwardLayer copied it; its
  /// output is not kept. Sequential GPTQ's chunk replays need only the
  /// routed experts' moments, so they skip the attention this way.
  Status observeMoeBlock(int64_t layer, const float *moeInput, int64_t tokens);
  /// The backward pass for activations (no weight gradients): runs
  /// `tokens` as one window from position 0 (the embedding rows, or
  /// `embeddings` [T, H] when given), returns the mean cross-entropy of
  /// predicting tokens[1..] and reports the gradients of that loss to
  /// `observer`, layer by layer from the last. Each layer is recomputed
  /// from its saved input with the engine's kernels (activation
  /// checkpointing); top-k choices carry no gradient (autograd's
  /// convention). The attached EngineObserver sees nothing of it.
  Expected<double> lossGradients(std::span<const int32_t> tokens, GradientObserver &observer,
                                 std::span<const float> embeddings = {});
  /// Reads layer weights from `provider` from now on (cached layers are
  /// dropped; the embedding and head are kept): a pass changed the layers.
  void replaceLayerWeights(std::unique_ptr<WeightProvider> provider);
  /// Gives the expert cache of an engine made with one
  /// (EngineOptions::expertCacheBytes) a new budget, dropping what it held:
  /// for a run that sizes it once it knows what else it holds.
  Status setExpertCacheBytes(size_t bytes);

  /// Replaces the masked experts (EngineOptions::maskedExperts): from the
  /// next forward on, these router rows are -inf. Fails, changing nothing,
  /// on a layer that is not MoE, an expert it lacks, or fewer than top-k left.
  Status setMaskedExperts(const std::map<int64_t, std::set<int64_t>> &masked);
  const std::map<int64_t, std::set<int64_t>> &maskedExpertSets() const { return maskedExperts; }
  /// Runs expert slot s of layer l with replaced[l][s] instead of its own
  /// weights (the same shapes, float or bf16 matrices), until replaced
  /// again; empty: every expert its own. For searches that score candidate
  /// experts without rebuilding the model; refused with a device or an
  /// expert cache (neither would see the replacement).
  Status setReplacedExperts(std::map<int64_t, std::map<int64_t, std::shared_ptr<const MlpWeights>>> replaced);
  /// Decoder layer `layer`'s weights as the engine runs them (loaded if
  /// needed).
  Expected<std::shared_ptr<const LayerWeights>> layerWeights(int64_t layer);
  /// Whether some experts were never loaded (EngineOptions::loadMaskedExperts).
  bool hasUnloadedExperts() const { return !unloadedExperts.empty(); }
  /// Attaches `observer` (not owned; null detaches).
  void setObserver(EngineObserver *observer) { this->observer = observer; }
  EngineObserver *attachedObserver() const { return observer; }
  const LayerCache &layerCache() const { return *layers; }
  /// The expert cache (EngineOptions::expertCacheBytes), or null.
  const ExpertCache *expertCache() const { return experts.get(); }
  ExpertCache *expertCache() { return experts.get(); }
  /// The device matrix products run on, or null (the CPU).
  Device *device() const { return onDevice.get(); }
  const RoutingCounters &routingCounters() const { return counters; }
  void resetRoutingCounters() { counters = {}; }
  void restoreRoutingCounters(const RoutingCounters &saved) { counters = saved; }

private:
  Engine() = default;
  /// Tokens with the residual stream on the device (Device::decodeBegin
  /// and on): attention there, routing there for the MoE layers it holds
  /// whole (else on the host), experts there. One token (decode), or a
  /// prompt in chunks of kDeviceChunk tokens (Device::prefillsOnDevice),
  /// whose MoE layers the host routes; logits of the last token, or of all
  /// (lastOnly false).
  Status decodeOnDevice(std::span<const int32_t> tokens, KvCache &cache, std::vector<float> &logits, bool lastOnly);
  /// One step of decodeOnDevice: `tokens` at cache.length on, with RoPE
  /// angles cos and sin [tokens, ropeHalf]; the last `rows` tokens' logits.
  /// The caller counts the tokens into the cache, or has the device abandon
  /// them.
  Status decodeLayersOnDevice(std::span<const int32_t> tokens, const float *cos, const float *sin, int64_t ropeHalf,
                              KvCache &cache, std::vector<float> &logits, int64_t rows);
  /// A layer's attention and MLP for a step of several tokens on the
  /// device: the MLP input and router logits come back, the host routes,
  /// and the device runs the block (Device::decodeRoutedBlock) or adds what
  /// the host ran.
  Status stepMlpOnDevice(int64_t l, const LayerWeights &w, const LayerSpec &layer, const std::set<int64_t> *masked,
                         const float *cos, const float *sin, int64_t ropeHalf, int64_t T, KvCache &cache,
                         std::vector<float> &normed, std::vector<float> &branch);
  /// Tokens of a prompt's step on the device (their attention scores and
  /// hand-backs grow with it).
  static constexpr int64_t kDeviceChunk = 256;
  /// Whether decodeOnDevice can run this model: decided at its first use.
  bool devicePathReady();
  /// The MoE block of layer `l` on normed[T, H] (the norm of `residual`,
  /// the stream entering it) into out[T, H], with the engine's hooks.
  Status runMoeBlock(int64_t l, const LayerWeights &w, const float *normed, const float *residual, int64_t T,
                     float *out);

  ModelSpec modelSpec;
  std::unique_ptr<WeightProvider> provider;
  std::unique_ptr<LayerCache> layers;
  std::shared_ptr<Device> onDevice;
  std::optional<bool> deviceDecodes;
  size_t layerBudget = 0;
  std::unique_ptr<ExpertCache> experts;
  size_t expertCacheBytes = 0;
  ExpertCachePolicy expertCachePolicy = ExpertCachePolicy::Lru;
  bool rowTiles = true;
  GlobalWeights globals;
  std::map<int64_t, std::set<int64_t>> maskedExperts;
  std::map<int64_t, std::map<int64_t, std::shared_ptr<const MlpWeights>>> replacedExperts;
  std::map<int64_t, std::set<int64_t>> unloadedExperts; ///< EngineOptions::loadMaskedExperts false.
  std::vector<float> inverseFrequencies;
  EngineObserver *observer = nullptr;
  RoutingCounters counters;
};

} // namespace moe

#endif // MOE_RUNTIME_ENGINE_H
