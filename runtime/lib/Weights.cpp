//===- Weights.cpp - Weights of the engine, loaded by layer ---------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Weights.h"
#include "moe/Frontend/Checkpoint.h"

#include "common/RowTiles.h"
#include "moe/Support/MappedFile.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace moe {

WeightSlot globalSlot(GlobalWeights &g, TensorRole role) {
  switch (role) {
  case TensorRole::Embedding:
    return {&g.embedding, nullptr};
  case TensorRole::LmHead:
    return {&g.lmHead, nullptr};
  case TensorRole::LmHeadBias:
    return {nullptr, &g.lmHeadBias};
  case TensorRole::FinalNorm:
    return {nullptr, &g.finalNorm};
  case TensorRole::FinalNormBias:
    return {nullptr, &g.finalNormBias};
  default:
    return {};
  }
}

WeightSlot layerSlot(LayerWeights &w, TensorRole role) {
  switch (role) {
  case TensorRole::AttentionNorm:
    return {nullptr, &w.attentionNorm};
  case TensorRole::AttentionNormBias:
    return {nullptr, &w.attentionNormBias};
  case TensorRole::MlpNorm:
    return {nullptr, &w.mlpNorm};
  case TensorRole::MlpNormBias:
    return {nullptr, &w.mlpNormBias};
  case TensorRole::QueryProj:
    return {&w.query, nullptr};
  case TensorRole::KeyProj:
    return {&w.key, nullptr};
  case TensorRole::ValueProj:
    return {&w.value, nullptr};
  case TensorRole::OutputProj:
    return {&w.output, nullptr};
  case TensorRole::QueryBias:
    return {nullptr, &w.queryBias};
  case TensorRole::KeyBias:
    return {nullptr, &w.keyBias};
  case TensorRole::ValueBias:
    return {nullptr, &w.valueBias};
  case TensorRole::OutputBias:
    return {nullptr, &w.outputBias};
  case TensorRole::QueryNorm:
    return {nullptr, &w.queryNorm};
  case TensorRole::KeyNorm:
    return {nullptr, &w.keyNorm};
  case TensorRole::QueryDownProj:
    return {&w.queryDown, nullptr};
  case TensorRole::QueryDownNorm:
    return {nullptr, &w.queryDownNorm};
  case TensorRole::QueryUpProj:
    return {&w.queryUp, nullptr};
  case TensorRole::KvDownProj:
    return {&w.kvDown, nullptr};
  case TensorRole::KvDownNorm:
    return {nullptr, &w.kvDownNorm};
  case TensorRole::KvUpProj:
    return {&w.kvUp, nullptr};
  case TensorRole::DenseGate:
    return {&w.dense.gate, nullptr};
  case TensorRole::DenseUp:
    return {&w.dense.up, nullptr};
  case TensorRole::DenseDown:
    return {&w.dense.down, nullptr};
  case TensorRole::Router:
    return {&w.router, nullptr};
  case TensorRole::RouterCorrectionBias:
    return {nullptr, &w.routerCorrectionBias};
  case TensorRole::SharedGate:
    return {&w.shared.gate, nullptr};
  case TensorRole::SharedUp:
    return {&w.shared.up, nullptr};
  case TensorRole::SharedDown:
    return {&w.shared.down, nullptr};
  case TensorRole::SharedExpertGate:
    return {nullptr, &w.sharedExpertGate};
  default:
    return {};
  }
}

void Matrix::copyRow(int64_t r, float *out) const {
  if (ggmlType)
    quant::ggmlDequantizeRows(*ggmlType, quantData, cols, r, r + 1, out);
  else if (isQuantized())
    quant::dequantizeRows(quantView(), r, r + 1, out);
  else if (isBf16())
    for (int64_t c = 0; c < cols; ++c)
      out[c] = bfloat16ToFloat(bf16[static_cast<size_t>(r * cols + c)]);
  else
    std::copy_n(data.data() + r * cols, cols, out);
}

size_t LayerWeights::bytes() const {
  size_t total = 0;
  for (const Matrix *matrix : {&query, &key, &value, &output, &queryDown, &queryUp, &kvDown, &kvUp, &router})
    total += matrix->bytes();
  for (const std::vector<float> *vector :
       {&attentionNorm, &attentionNormBias, &mlpNorm, &mlpNormBias, &queryBias, &keyBias, &valueBias, &outputBias,
        &queryNorm, &keyNorm, &queryDownNorm, &kvDownNorm, &routerCorrectionBias, &sharedExpertGate})
    total += vector->size() * sizeof(float);
  total += dense.bytes() + shared.bytes() + expertBase.bytes();
  for (const MlpWeights &expert : experts)
    total += expert.bytes();
  return total;
}

Status forEachMatrix(MlpWeights &mlp, const std::function<Status(Matrix &)> &visit) {
  for (Matrix *matrix : {&mlp.gate, &mlp.up, &mlp.down})
    if (!matrix->empty())
      MOE_RETURN_IF_ERROR(visit(*matrix));
  for (MlpWeights &part : mlp.moreParts)
    MOE_RETURN_IF_ERROR(forEachMatrix(part, visit));
  for (Matrix &factor : mlp.lowRank)
    MOE_RETURN_IF_ERROR(visit(factor));
  return Status::success();
}

Status forEachMatrix(LayerWeights &layer, const std::function<Status(Matrix &)> &visit) {
  for (Matrix *matrix : {&layer.query, &layer.key, &layer.value, &layer.output, &layer.queryDown, &layer.queryUp,
                         &layer.kvDown, &layer.kvUp})
    if (!matrix->empty())
      MOE_RETURN_IF_ERROR(visit(*matrix));
  MOE_RETURN_IF_ERROR(forEachMatrix(layer.dense, visit));
  MOE_RETURN_IF_ERROR(forEachMatrix(layer.shared, visit));
  MOE_RETURN_IF_ERROR(forEachMatrix(layer.expertBase, visit));
  for (MlpWeights &expert : layer.experts)
    MOE_RETURN_IF_ERROR(forEachMatrix(expert, visit));
  return Status::success();
}

void makeRowTiles(Matrix &matrix) {
  const std::optional<quant::QuantMatrixView> view = matrix.groupView();
  if (!view || view->tiles || !quant::rowTilesHelp(view->format))
    return;
  const size_t bytes = quant::rowTileLayout(view->format, matrix.rows, matrix.cols).totalBytes;
  // 64-byte aligned, so that no code line straddles two cache lines.
  const size_t rounded = (bytes + 63) / 64 * 64;
  std::shared_ptr<uint8_t[]> tiles(static_cast<uint8_t *>(std::aligned_alloc(64, rounded)),
                                   [](uint8_t *p) { std::free(p); });
  if (!tiles)
    return; // the stored rows serve as before
  quant::packRowTiles(*view, tiles.get());
  const size_t codeBytes = matrix.bytes();
  matrix.rowTiles = std::move(tiles);
  matrix.rowTileBytes = bytes;
  if (matrix.quantMapping)
    matrix.quantMapping->releasePages(matrix.quantData, codeBytes);
}

void makeRowTiles(MlpWeights &mlp) {
  (void)forEachMatrix(mlp, [](Matrix &matrix) {
    makeRowTiles(matrix);
    return Status::success();
  });
}

void makeRowTiles(LayerWeights &layer) {
  (void)forEachMatrix(layer, [](Matrix &matrix) {
    makeRowTiles(matrix);
    return Status::success();
  });
}

namespace {

class CheckpointWeightProvider : public WeightProvider {
public:
  CheckpointWeightProvider(const ModelSpec &spec, std::shared_ptr<const Checkpoint> checkpoint)
      : spec(spec), checkpoint(std::move(checkpoint)), byLayer(static_cast<size_t>(spec.numLayers + 1)) {
    for (TensorSpec &tensor : this->spec.tensors())
      byLayer[static_cast<size_t>(tensor.layer + 1)].push_back(std::move(tensor));
  }

  Status loadGlobals(GlobalWeights &globals) override {
    for (const TensorSpec &tensor : byLayer[0]) {
      const WeightSlot slot = globalSlot(globals, tensor.role);
      if (slot.matrix)
        MOE_RETURN_IF_ERROR(loadMatrix(tensor, *slot.matrix));
      else if (slot.vector)
        MOE_RETURN_IF_ERROR(load(tensor, *slot.vector));
      else
        return Status::error("tensor '", tensor.name, "': unexpected model-level role ", tensorRoleName(tensor.role));
    }
    return Status::success();
  }

  Status loadLayer(int64_t layer, LayerWeights &w, bool routedExperts) override {
    if (layer < 0 || layer >= spec.numLayers)
      return Status::error("layer ", layer, " out of range [0, ", spec.numLayers, ")");
    const LayerSpec &layerSpec = spec.layers[static_cast<size_t>(layer)];
    if (layerSpec.mlp == MlpKind::Moe)
      w.experts.assign(static_cast<size_t>(layerSpec.numExperts), MlpWeights());
    for (const TensorSpec &tensor : byLayer[static_cast<size_t>(layer + 1)]) {
      if (!routedExperts && isRoutedExpertRole(tensor.role))
        continue;
      Status status = Status::success();
      MlpWeights *expert = tensor.expert >= 0 ? &w.experts[static_cast<size_t>(tensor.expert)] : nullptr;
      switch (tensor.role) {
      case TensorRole::ExpertGate:
        status = loadMatrix(tensor, expert->gate);
        break;
      case TensorRole::ExpertUp:
        status = loadMatrix(tensor, expert->up);
        break;
      case TensorRole::ExpertDown:
        status = loadMatrix(tensor, expert->down);
        break;
      case TensorRole::ExpertGateUpFused:
        status = loadFusedGateUp(tensor, layerSpec, w);
        break;
      case TensorRole::ExpertDownFused:
        status = loadFusedDown(tensor, layerSpec, w);
        break;
      default:
        if (const WeightSlot slot = layerSlot(w, tensor.role); slot.matrix)
          status = loadMatrix(tensor, *slot.matrix);
        else if (slot.vector)
          status = load(tensor, *slot.vector);
        else
          status = Status::error("tensor '", tensor.name, "': unexpected layer role ", tensorRoleName(tensor.role));
      }
      MOE_RETURN_IF_ERROR(status);
    }
    return Status::success();
  }

  Status loadExpert(int64_t layer, int64_t slot, MlpWeights &expert) override {
    if (layer < 0 || layer >= spec.numLayers || spec.layers[static_cast<size_t>(layer)].mlp != MlpKind::Moe ||
        slot < 0 || slot >= spec.layers[static_cast<size_t>(layer)].numExperts)
      return Status::error("layer ", layer, " has no routed expert ", slot);
    const LayerSpec &layerSpec = spec.layers[static_cast<size_t>(layer)];
    for (const TensorSpec &tensor : byLayer[static_cast<size_t>(layer + 1)]) {
      if (tensor.role == TensorRole::ExpertGateUpFused || tensor.role == TensorRole::ExpertDownFused) {
        // Fused [E, ...] tensors: every expert is converted to take one
        // (a package stores experts one by one and reads only its own).
        LayerWeights all;
        all.experts.assign(static_cast<size_t>(layerSpec.numExperts), MlpWeights());
        MOE_RETURN_IF_ERROR(tensor.role == TensorRole::ExpertGateUpFused ? loadFusedGateUp(tensor, layerSpec, all)
                                                                         : loadFusedDown(tensor, layerSpec, all));
        MlpWeights &mine = all.experts[static_cast<size_t>(slot)];
        if (tensor.role == TensorRole::ExpertGateUpFused) {
          expert.gate = std::move(mine.gate);
          expert.up = std::move(mine.up);
        } else {
          expert.down = std::move(mine.down);
        }
        continue;
      }
      if (tensor.expert != slot)
        continue;
      if (tensor.role == TensorRole::ExpertGate)
        MOE_RETURN_IF_ERROR(loadMatrix(tensor, expert.gate));
      else if (tensor.role == TensorRole::ExpertUp)
        MOE_RETURN_IF_ERROR(loadMatrix(tensor, expert.up));
      else if (tensor.role == TensorRole::ExpertDown)
        MOE_RETURN_IF_ERROR(loadMatrix(tensor, expert.down));
    }
    return Status::success();
  }

private:
  static bool isRoutedExpertRole(TensorRole role) {
    return role == TensorRole::ExpertGate || role == TensorRole::ExpertUp || role == TensorRole::ExpertDown ||
           role == TensorRole::ExpertGateUpFused || role == TensorRole::ExpertDownFused;
  }

  Status load(const TensorSpec &tensor, std::vector<float> &out) {
    MOE_RETURN_IF_ERROR(checkpoint->loadF32(tensor.name, out));
    // The f32 copy is what the engine uses; let the mapped pages go.
    if (const TensorLocation *location = checkpoint->find(tensor.name))
      location->file->releasePages(*location->info);
    return Status::success();
  }
  Status loadMatrix(const TensorSpec &tensor, Matrix &out) {
    if (tensor.shape.size() != 2)
      return Status::error("tensor '", tensor.name, "' is not a matrix");
    out.rows = tensor.shape[0];
    out.cols = tensor.shape[1];
    const TensorLocation *location = checkpoint->find(tensor.name);
    if (location && location->info->dtype == DType::BF16) {
      // Keep the bf16 bits: exact, and half the bytes of an f32 copy.
      std::span<const uint8_t> bytes = location->bytes();
      out.bf16.resize(bytes.size() / 2);
      std::memcpy(out.bf16.data(), bytes.data(), bytes.size());
      location->file->releasePages(*location->info);
      return Status::success();
    }
    return load(tensor, out.data);
  }

  /// Copies [rows, cols] block `index` of a 3-D [E, a, b] tensor into
  /// `out`, rows [rowBegin, rowBegin + rows) of the (possibly transposed)
  /// per-expert matrix.
  static void sliceExpert(const std::vector<float> &fused, int64_t index, int64_t a, int64_t b, bool transposed,
                          int64_t rowBegin, int64_t rows, Matrix &out) {
    // Per-expert matrix M is [a, b] stored, or its transpose [b, a].
    int64_t cols = transposed ? a : b;
    out.rows = rows;
    out.cols = cols;
    out.data.resize(static_cast<size_t>(rows * cols));
    const float *base = fused.data() + index * a * b;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        out.data[r * cols + c] = transposed ? base[c * b + (rowBegin + r)] : base[(rowBegin + r) * b + c];
  }

  Status loadFusedGateUp(const TensorSpec &tensor, const LayerSpec &layer, LayerWeights &w) {
    std::vector<float> fused;
    MOE_RETURN_IF_ERROR(load(tensor, fused));
    const int64_t I = layer.expertIntermediateSize;
    for (int64_t e = 0; e < layer.numExperts; ++e) {
      sliceExpert(fused, e, tensor.shape[1], tensor.shape[2], layer.fusedTransposed, 0, I, w.experts[e].gate);
      sliceExpert(fused, e, tensor.shape[1], tensor.shape[2], layer.fusedTransposed, I, I, w.experts[e].up);
    }
    return Status::success();
  }

  Status loadFusedDown(const TensorSpec &tensor, const LayerSpec &layer, LayerWeights &w) {
    std::vector<float> fused;
    MOE_RETURN_IF_ERROR(load(tensor, fused));
    for (int64_t e = 0; e < layer.numExperts; ++e)
      sliceExpert(fused, e, tensor.shape[1], tensor.shape[2], layer.fusedTransposed, 0, spec.hiddenSize,
                  w.experts[e].down);
    return Status::success();
  }

  ModelSpec spec;
  std::shared_ptr<const Checkpoint> checkpoint;
  /// Index 0: model-level tensors; index l + 1: layer l.
  std::vector<std::vector<TensorSpec>> byLayer;
};

} // namespace

std::unique_ptr<WeightProvider> makeCheckpointWeightProvider(const ModelSpec &spec,
                                                             std::shared_ptr<const Checkpoint> checkpoint) {
  return std::make_unique<CheckpointWeightProvider>(spec, std::move(checkpoint));
}

LayerCache::LayerCache(WeightProvider &provider, int64_t numLayers, size_t budgetBytes, bool routedExperts,
                       const std::map<int64_t, std::set<int64_t>> *skipped)
    : provider(provider), budget(budgetBytes), routedExperts(routedExperts), skipped(skipped),
      layers(static_cast<size_t>(numLayers)), layerBytes(static_cast<size_t>(numLayers), 0) {}

ExpertCache::ExpertCache(WeightProvider &provider, size_t budgetBytes, ExpertCachePolicy policy, bool rowTiles)
    : provider(provider), budget(budgetBytes), policy(policy), rowTiles(rowTiles) {}

namespace {

/// `matrix`'s values rounded to `format` (RTN, the scalar reference).
void requantize(const Matrix &matrix, const quant::QuantFormat &format, Matrix &out) {
  std::vector<float> values(static_cast<size_t>(matrix.rows * matrix.cols));
  for (int64_t r = 0; r < matrix.rows; ++r)
    matrix.copyRow(r, values.data() + r * matrix.cols);
  out = Matrix();
  out.rows = matrix.rows;
  out.cols = matrix.cols;
  out.quantFormat = format;
  out.quantStorage.resize(format.matrixBytes(matrix.rows, matrix.cols));
  quant::quantizeReference(format, values.data(), matrix.rows, matrix.cols, out.quantStorage.data());
  out.quantData = out.quantStorage.data();
}

void requantize(const MlpWeights &expert, const quant::QuantFormat &format, MlpWeights &out) {
  if (expert.factored()) {
    // A factored expert's copy: its low-rank factors rounded (the base stays).
    out.lowRank.resize(expert.lowRank.size());
    for (size_t f = 0; f < expert.lowRank.size(); ++f)
      requantize(expert.lowRank[f], format, out.lowRank[f]);
    return;
  }
  requantize(expert.gate, format, out.gate);
  requantize(expert.up, format, out.up);
  requantize(expert.down, format, out.down);
  out.moreParts.resize(expert.moreParts.size());
  for (size_t p = 0; p < expert.moreParts.size(); ++p)
    requantize(expert.moreParts[p], format, out.moreParts[p]);
}

} // namespace

Status ExpertCache::buildFallbacks(const std::map<int64_t, int64_t> &slots,
                                   const std::map<int64_t, std::set<int64_t>> &skipped,
                                   const std::optional<quant::QuantFormat> &format, double threshold) {
  below = threshold;
  for (const auto &[layer, count] : slots)
    for (int64_t slot = 0; slot < count; ++slot) {
      if (auto left = skipped.find(layer); left != skipped.end() && left->second.count(slot))
        continue; // never loaded (a task set chosen at load)
      auto low = std::make_shared<MlpWeights>();
      if (format) {
        MlpWeights stored;
        MOE_RETURN_IF_ERROR(provider.loadExpert(layer, slot, stored));
        requantize(stored, *format, *low);
      } else {
        MOE_RETURN_IF_ERROR(provider.loadNestedLow(layer, slot, *low));
      }
      if (rowTiles)
        makeRowTiles(*low); // as every expert that runs on the CPU
      lowBitBytes += low->bytes();
      fallbacks[{layer, slot}] = std::move(low);
    }
  return Status::success();
}

std::shared_ptr<const MlpWeights> ExpertCache::fallback(int64_t layer, int64_t slot) {
  ++uses[{layer, slot}];
  ++clock;
  ++stats.fallbacks;
  return fallbacks.at({layer, slot});
}

Expected<std::shared_ptr<const MlpWeights>> ExpertCache::get(int64_t layer, int64_t slot) {
  const std::pair<int64_t, int64_t> key{layer, slot};
  ++uses[key];
  ++clock;
  if (auto found = entries.find(key); found != entries.end()) {
    ++stats.hits;
    found->second.lastUse = clock;
    return found->second.weights;
  }
  auto weights = std::make_shared<MlpWeights>();
  MOE_RETURN_IF_ERROR(provider.loadExpert(layer, slot, *weights));
  if (rowTiles)
    makeRowTiles(*weights); // experts from this cache run on the CPU
  const size_t size = weights->bytes();
  ++stats.misses;
  stats.bytesLoaded += size;
  // Evict until the newcomer fits (or nothing is left: an expert larger
  // than the budget still runs, alone).
  while (!entries.empty() && resident + size > budget) {
    auto victim = entries.begin();
    for (auto it = entries.begin(); it != entries.end(); ++it) {
      const bool lessUsed = uses[it->first] < uses[victim->first];
      const bool sameUse = uses[it->first] == uses[victim->first];
      const bool older = it->second.lastUse < victim->second.lastUse;
      if (policy == ExpertCachePolicy::Frequency ? (lessUsed || (sameUse && older)) : older)
        victim = it;
    }
    resident -= victim->second.bytes;
    entries.erase(victim);
  }
  entries[key] = {weights, size, clock};
  resident += size;
  peak = std::max(peak, resident);
  return std::shared_ptr<const MlpWeights>(std::move(weights));
}

size_t LayerCache::distinctLayerBytes() const {
  size_t total = 0;
  for (size_t bytes : layerBytes)
    total += bytes;
  return total;
}

Expected<std::shared_ptr<const LayerWeights>> LayerCache::get(int64_t layer) {
  std::shared_ptr<const LayerWeights> &slot = layers[static_cast<size_t>(layer)];
  if (slot) {
    recent.remove(layer);
    recent.push_front(layer);
    return slot;
  }
  // Evict least recently used layers first, so that the new layer (assumed
  // as large as the largest seen) fits: peak memory stays one layer under a
  // one-layer budget. A layer still in use by a caller stays alive through
  // its shared_ptr.
  auto evictUntil = [&](size_t incoming) {
    while (!recent.empty() && resident + incoming > budget) {
      int64_t victim = recent.back();
      recent.pop_back();
      resident -= layers[static_cast<size_t>(victim)]->bytes();
      layers[static_cast<size_t>(victim)].reset();
    }
  };
  evictUntil(largestLayer);
  auto weights = std::make_shared<LayerWeights>();
  const std::set<int64_t> *skip = nullptr;
  if (skipped && routedExperts)
    if (auto found = skipped->find(layer); found != skipped->end() && !found->second.empty())
      skip = &found->second;
  MOE_RETURN_IF_ERROR(provider.loadLayer(layer, *weights, routedExperts && !skip));
  if (skip)
    for (size_t e = 0; e < weights->experts.size(); ++e)
      if (!weights->routing.remap.empty() || !skip->count(static_cast<int64_t>(e)))
        MOE_RETURN_IF_ERROR(provider.loadExpert(layer, static_cast<int64_t>(e), weights->experts[e]));
  if (device)
    MOE_RETURN_IF_ERROR(device->uploadLayer(*weights));
  else if (rowTiles)
    makeRowTiles(*weights);
  size_t size = weights->bytes();
  largestLayer = std::max(largestLayer, size);
  evictUntil(size);
  slot = std::move(weights);
  resident += size;
  peak = std::max(peak, resident);
  ++loadCount;
  loaded += size;
  layerBytes[static_cast<size_t>(layer)] = size;
  recent.push_front(layer);
  return slot;
}

} // namespace moe
