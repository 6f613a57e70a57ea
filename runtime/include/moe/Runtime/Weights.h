//===- Weights.h - Weights of the engine, loaded by layer -------*- C++ -*-===//
//
// Part of moec. The engine computes in f32 from weights stored in any float
// dtype (bf16 matrices stay bf16 in memory, others become f32). A
// WeightProvider turns a model's stored tensors into these structs one
// decoder layer at a time; LayerCache keeps converted layers within a memory
// budget, so a model larger than memory runs with about one layer resident.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_WEIGHTS_H
#define MOE_RUNTIME_WEIGHTS_H

#include "cpu/GgmlKernels.h"
#include "cpu/QuantKernels.h"
#include "moe/Frontend/ModelSpec.h"
#include "moe/Runtime/Device.h"
#include "moe/Support/Status.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <vector>

namespace moe {

class Checkpoint;
class MappedFile;

/// A row-major [rows, cols] matrix; a Linear weight is [out, in]. Stored
/// as f32, or, when the checkpoint holds bf16, as those bf16 bits (exactly
/// the same values at half the memory and bandwidth; kernels widen them to
/// f32 as they compute).
struct Matrix {
  int64_t rows = 0, cols = 0;
  std::vector<float> data;
  std::vector<uint16_t> bf16;
  /// Group-wise integer codes (kernels/common/QuantFormat.h) at `quantData`,
  /// owned by `quantStorage` or by the mapping `quantOwner` keeps alive.
  std::optional<quant::QuantFormat> quantFormat;
  /// Or llama.cpp's block codes (kernels/common/GgmlFormats.h) at `quantData`.
  std::optional<quant::GgmlType> ggmlType;
  const uint8_t *quantData = nullptr;
  std::vector<uint8_t> quantStorage;
  std::shared_ptr<const void> quantOwner;
  /// The mapped file `quantData` lies in (kept alive by quantOwner), if any.
  const MappedFile *quantMapping = nullptr;
  /// The group codes again as row tiles (kernels/common/RowTiles.h), which
  /// the CPU products read instead: made by makeRowTiles when a layer is
  /// loaded for the CPU and the kernels read tiles faster
  /// (quant::rowTilesHelp). Immutable, so copies share them.
  std::shared_ptr<const uint8_t[]> rowTiles;
  size_t rowTileBytes = 0;
  /// Its copy in a Device's memory (Device.h), when the engine runs on one.
  std::shared_ptr<const DeviceMatrix> device;
  bool empty() const { return data.empty() && bf16.empty() && !quantData; }
  bool isBf16() const { return !bf16.empty(); }
  bool isQuantized() const { return quantData != nullptr; }
  quant::QuantMatrixView quantView() const { return {*quantFormat, quantData, rows, cols}; }
  /// The matrix as rows of a group format the integer kernels run: moec's
  /// formats, and ggml's Q4_0, Q4_1 and Q8_0 (the same bytes); nullopt for
  /// float matrices and the other ggml formats.
  std::optional<quant::QuantMatrixView> groupView() const {
    std::optional<quant::QuantMatrixView> view;
    if (quantFormat && !ggmlType)
      view = quantView();
    else if (ggmlType)
      if (std::optional<quant::GgmlGroupLayout> layout = quant::ggmlGroupLayout(*ggmlType))
        view = quant::QuantMatrixView{layout->format, quantData, rows, cols, layout->signedCodes};
    if (view)
      view->tiles = rowTiles.get();
    return view;
  }
  /// Bytes held: values, or codes (where tiles are made, the tiles and any
  /// codes held in quantStorage: mapped codes' pages are given back).
  size_t bytes() const {
    return data.size() * sizeof(float) + bf16.size() * sizeof(uint16_t) +
           (rowTiles     ? rowTileBytes + quantStorage.size()
            : !quantData ? 0
            : ggmlType   ? static_cast<size_t>(rows) * quant::ggmlRowBytes(*ggmlType, cols)
                         : quantFormat->matrixBytes(rows, cols));
  }
  /// Copies row `r` as f32 into `out`.
  void copyRow(int64_t r, float *out) const;
};

/// gate/up/down of a SwiGLU MLP: y = down(silu(gate x) * up x).
struct MlpWeights {
  Matrix gate, up, down;
  /// Further neuron segments of a routed expert split by micro-expert
  /// mixed precision (each with its own formats); the expert's output is
  /// the sum over its parts, its intermediate their concatenation.
  std::vector<MlpWeights> moreParts;
  /// A factored routed expert (moe-factor-experts): gate, up and down are
  /// empty, and each is the layer's base (LayerWeights::expertBase) plus a
  /// low-rank product a b, held here as {gate a, gate b, up a, up b, down a,
  /// down b} (a: [out, rank], b: [rank, in]).
  std::vector<Matrix> lowRank;
  bool factored() const { return !lowRank.empty(); }
  size_t bytes() const {
    size_t total = gate.bytes() + up.bytes() + down.bytes();
    for (const MlpWeights &part : moreParts)
      total += part.bytes();
    for (const Matrix &factor : lowRank)
      total += factor.bytes();
    return total;
  }
};

/// How a MoE layer routes when it differs from the ModelSpec's router:
/// compressed modules give each layer its own.
struct RoutingPlan {
  /// The layer's router (top-k, groups); nullopt: the ModelSpec's.
  std::optional<RouterSpec> router;
  /// Router row r is served by expert slot remap[r] (merged experts share a
  /// slot); empty: row r is slot r.
  std::vector<int32_t> remap;
  /// Dynamic skipping (NAEE, MC-MoE ODP): a chosen expert other than the
  /// first is skipped when its weight is below this fraction of the first's;
  /// the kept weights are rescaled to the sum of all chosen. 0: off.
  double skipThreshold = 0;
};

/// Everything one decoder layer needs. Fields a family does not use stay
/// empty.
struct LayerWeights {
  std::vector<float> attentionNorm, attentionNormBias, mlpNorm, mlpNormBias;
  // Grouped-query attention.
  Matrix query, key, value, output;
  std::vector<float> queryBias, keyBias, valueBias, outputBias, queryNorm, keyNorm;
  // Multi-head latent attention.
  Matrix queryDown, queryUp, kvDown, kvUp;
  std::vector<float> queryDownNorm, kvDownNorm;
  // MLP: dense, or router + routed experts + shared expert.
  MlpWeights dense;
  Matrix router;
  std::vector<float> routerCorrectionBias;
  std::vector<MlpWeights> experts;
  /// The base every factored expert adds its low-rank deltas to
  /// (moe-factor-experts); empty unless the layer's experts are factored.
  MlpWeights expertBase;
  MlpWeights shared;
  std::vector<float> sharedExpertGate; ///< [hidden], Qwen2-MoE.
  RoutingPlan routing;
  /// A Device's copies of the vectors above (norms, biases), when the
  /// engine decodes on one (Device::uploadLayer).
  std::shared_ptr<const void> deviceVectors;

  size_t bytes() const;
};

/// Calls `visit` on every matrix of the layer that is not empty (attention,
/// dense, shared and routed experts with their split parts; not the router,
/// which devices copy with the vectors), stopping at the first error.
Status forEachMatrix(LayerWeights &layer, const std::function<Status(Matrix &)> &visit);
Status forEachMatrix(MlpWeights &mlp, const std::function<Status(Matrix &)> &visit);

/// For the CPU: gives each group-format matrix of these weights row tiles
/// where the kernels read those faster (quant::rowTilesHelp), then lets the
/// kernel drop the mapped pages of its codes (they are read again if
/// touched: an embedding row, a device upload).
void makeRowTiles(Matrix &matrix);
void makeRowTiles(LayerWeights &layer);
void makeRowTiles(MlpWeights &mlp);

/// Model-level weights.
struct GlobalWeights {
  Matrix embedding;
  std::vector<float> finalNorm, finalNormBias;
  Matrix lmHead; ///< Empty when tied to the embedding.
  std::vector<float> lmHeadBias;
  std::shared_ptr<const void> deviceVectors; ///< A Device's copies of the vectors.
  const Matrix &outputProjection() const { return lmHead.empty() ? embedding : lmHead; }
};

/// Where a tensor of a role goes: a matrix or a vector (one set), or
/// neither for roles these structs do not hold one by one (routed experts,
/// fused experts) or that are not model-level (resp. layer) roles.
struct WeightSlot {
  Matrix *matrix = nullptr;
  std::vector<float> *vector = nullptr;
};
WeightSlot globalSlot(GlobalWeights &globals, TensorRole role);
WeightSlot layerSlot(LayerWeights &layer, TensorRole role);

/// Where weights come from: a checkpoint today; packages and simulated-
/// quantised modules implement the same interface later.
class WeightProvider {
public:
  virtual ~WeightProvider() = default;
  virtual Status loadGlobals(GlobalWeights &globals) = 0;
  /// Decoder layer `layer`. With `routedExperts` false, `weights.experts`
  /// holds one empty MlpWeights per slot: an ExpertCache loads them.
  virtual Status loadLayer(int64_t layer, LayerWeights &weights, bool routedExperts) = 0;
  Status loadLayer(int64_t layer, LayerWeights &weights) { return loadLayer(layer, weights, true); }
  /// Routed expert slot `slot` of layer `layer` alone (with its split parts).
  virtual Status loadExpert(int64_t layer, int64_t slot, MlpWeights &expert) = 0;
  /// The same expert at the low bits of its nested matrices
  /// (quant::NestedFormat); an error where it has none.
  virtual Status loadNestedLow(int64_t layer, int64_t slot, MlpWeights &expert) {
    return Status::error("layer ", layer, " expert slot ", slot,
                         ": the model has no nested bit widths (moe-quantize nested-bits)");
  }
};

/// Reads a Hugging Face checkpoint bound to `spec` (bindCheckpoint), in any
/// float dtype including FP8 with block scales, per-expert or fused.
std::unique_ptr<WeightProvider> makeCheckpointWeightProvider(const ModelSpec &spec,
                                                             std::shared_ptr<const Checkpoint> checkpoint);

/// How an ExpertCache chooses what to evict.
enum class ExpertCachePolicy {
  Lru,       ///< The least recently used expert.
  Frequency, ///< The expert routed to least often so far (ties: least recent).
};

/// What an ExpertCache did.
struct ExpertCacheCounters {
  int64_t hits = 0, misses = 0;
  int64_t fallbacks = 0; ///< Missing experts run from their low-bit copy instead (HOBBIT).
  uint64_t bytesLoaded = 0;
  double hitRate() const {
    return hits + misses > 0 ? static_cast<double>(hits) / static_cast<double>(hits + misses) : 0;
  }
};

/// Routed experts within a byte budget, loaded one by one on demand (expert
/// offloading: the rest of each layer stays in the LayerCache). An expert
/// still in use by a caller stays alive through its shared_ptr.
class ExpertCache {
public:
  /// `rowTiles`: loaded experts (and low-bit copies) get row tiles.
  ExpertCache(WeightProvider &provider, size_t budgetBytes, ExpertCachePolicy policy, bool rowTiles = true);
  /// Expert `slot` of layer `layer`, loading it (and evicting others) if needed.
  Expected<std::shared_ptr<const MlpWeights>> get(int64_t layer, int64_t slot);
  bool contains(int64_t layer, int64_t slot) const { return entries.count({layer, slot}) > 0; }

  /// HOBBIT's low-precision replacement: each expert of `slots` (per layer,
  /// the slot count; those in `skipped` excepted) is read once and kept,
  /// apart from the budget, in `format` (RTN of its values, as stored or
  /// dequantised; nullopt: the low part of its nested matrices, as stored);
  /// a missing expert whose largest share of
  /// a token's routing weight is below `below` (1: every missing expert)
  /// then runs from that copy (fallback()) instead of being loaded.
  Status buildFallbacks(const std::map<int64_t, int64_t> &slots, const std::map<int64_t, std::set<int64_t>> &skipped,
                        const std::optional<quant::QuantFormat> &format, double below);
  bool hasFallbacks() const { return !fallbacks.empty(); }
  double fallbackBelow() const { return below; }
  /// The low-bit copy of an expert (buildFallbacks), counted as a fallback.
  std::shared_ptr<const MlpWeights> fallback(int64_t layer, int64_t slot);
  size_t fallbackBytes() const { return lowBitBytes; }

  const ExpertCacheCounters &counters() const { return stats; }
  void resetCounters() { stats = {}; }
  size_t residentBytes() const { return resident; }
  size_t peakResidentBytes() const { return peak; }

private:
  struct Entry {
    std::shared_ptr<const MlpWeights> weights;
    size_t bytes = 0;
    int64_t lastUse = 0;
  };
  WeightProvider &provider;
  size_t budget;
  ExpertCachePolicy policy;
  bool rowTiles = true;
  size_t resident = 0, peak = 0;
  int64_t clock = 0;
  std::map<std::pair<int64_t, int64_t>, Entry> entries;
  std::map<std::pair<int64_t, int64_t>, int64_t> uses; ///< Requests per expert since the start.
  std::map<std::pair<int64_t, int64_t>, std::shared_ptr<const MlpWeights>> fallbacks;
  double below = 0;
  size_t lowBitBytes = 0;
  ExpertCacheCounters stats;
};

/// Converted layers within a byte budget, least recently used evicted first.
class LayerCache {
public:
  /// With `routedExperts` false, layers are loaded without their routed
  /// experts (an ExpertCache holds those). `skipped` (optional, outliving
  /// the cache): per layer, expert slots never loaded (left empty), unless
  /// the layer has merged experts (a remap table).
  LayerCache(WeightProvider &provider, int64_t numLayers, size_t budgetBytes, bool routedExperts = true,
             const std::map<int64_t, std::set<int64_t>> *skipped = nullptr);
  /// Copies each layer, once loaded, to `device` (null: none).
  void setDevice(std::shared_ptr<Device> device) { this->device = std::move(device); }
  /// Without a device, whether loaded layers get row tiles (makeRowTiles).
  void setRowTiles(bool on) { rowTiles = on; }
  /// Layer `layer`, loading it (and evicting others) if needed.
  Expected<std::shared_ptr<const LayerWeights>> get(int64_t layer);
  /// Whether every layer is loaded now: get() then loads and evicts
  /// nothing.
  bool holdsEveryLayer() const {
    return std::all_of(layers.begin(), layers.end(), [](const auto &layer) { return layer != nullptr; });
  }
  size_t residentBytes() const { return resident; }
  size_t peakResidentBytes() const { return peak; }
  int64_t loads() const { return loadCount; }
  /// Bytes converted by every load so far (a layer loaded twice counts twice).
  size_t loadedBytes() const { return loaded; }
  /// Bytes of every layer loaded at least once (the model's layer weights
  /// after one full pass).
  size_t distinctLayerBytes() const;

private:
  WeightProvider &provider;
  std::shared_ptr<Device> device;
  size_t budget;
  bool routedExperts = true;
  bool rowTiles = true;
  const std::map<int64_t, std::set<int64_t>> *skipped = nullptr;
  size_t resident = 0, peak = 0, largestLayer = 0, loaded = 0;
  std::vector<size_t> layerBytes;
  int64_t loadCount = 0;
  std::vector<std::shared_ptr<const LayerWeights>> layers;
  std::list<int64_t> recent; ///< Most recent first.
};

} // namespace moe

#endif // MOE_RUNTIME_WEIGHTS_H
