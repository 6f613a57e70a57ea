//===- Description.cpp - Weights of a described model ---------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Description.h"
#include "common/WeightFormat.h"
#include "moe/Frontend/Checkpoint.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Frontend/WeightStore.h"
#include "moe/Support/HugePages.h"

#include <cmath>
#include <cstring>
#include <map>

namespace moe {
namespace {

/// An expert's matrices: gate, up, down, then each further part's.
std::vector<const TensorRef *> matricesOf(const ExpertEntry &expert) {
  std::vector<const TensorRef *> matrices = {&expert.gate, &expert.up, &expert.down};
  for (const ExpertPart &part : expert.moreParts)
    matrices.insert(matrices.end(), {&part.gate, &part.up, &part.down});
  for (const TensorRef &factor : expert.lowRank)
    matrices.push_back(&factor);
  return matrices;
}

class DescriptionWeightProvider : public WeightProvider {
public:
  explicit DescriptionWeightProvider(ModelDescription description) : description(std::move(description)) {}

  Status loadGlobals(GlobalWeights &globals) override {
    for (const auto &[role, tensor] : description.globals) {
      const WeightSlot slot = globalSlot(globals, role);
      if (slot.matrix)
        MOE_RETURN_IF_ERROR(loadMatrix(tensor, *slot.matrix));
      else if (slot.vector)
        MOE_RETURN_IF_ERROR(loadVector(tensor, *slot.vector));
      else
        return Status::error("tensor '", tensor.name, "': unexpected model-level role ", tensorRoleName(role));
    }
    return Status::success();
  }

  Status loadLayer(int64_t layer, LayerWeights &w, bool routedExperts) override {
    if (layer < 0 || layer >= static_cast<int64_t>(description.layers.size()))
      return Status::error("layer ", layer, " out of range [0, ", description.layers.size(), ")");
    const LayerEntry &entry = description.layers[static_cast<size_t>(layer)];
    for (const auto &[role, tensor] : entry.tensors) {
      const WeightSlot slot = layerSlot(w, role);
      Status status = slot.matrix ? loadMatrix(tensor, *slot.matrix)
                      : slot.vector
                          ? loadVector(tensor, *slot.vector)
                          : Status::error("tensor '", tensor.name, "': unexpected layer role ", tensorRoleName(role));
      MOE_RETURN_IF_ERROR(status);
    }
    if (entry.expertBase) {
      MOE_RETURN_IF_ERROR(loadMatrix(entry.expertBase->gate, w.expertBase.gate));
      MOE_RETURN_IF_ERROR(loadMatrix(entry.expertBase->up, w.expertBase.up));
      MOE_RETURN_IF_ERROR(loadMatrix(entry.expertBase->down, w.expertBase.down));
    }
    w.experts.assign(entry.experts.size(), MlpWeights());
    if (routedExperts)
      for (size_t slot = 0; slot < entry.experts.size(); ++slot)
        MOE_RETURN_IF_ERROR(loadExpert(layer, static_cast<int64_t>(slot), w.experts[slot]));
    w.routing = entry.routing;
    if (!w.router.empty()) {
      const int64_t slots = static_cast<int64_t>(w.experts.size());
      if (w.routing.remap.empty() && w.router.rows != slots)
        return Status::error("layer ", layer, ": the router has ", w.router.rows, " rows for ", slots,
                             " experts and no remap table");
      if (!w.routing.remap.empty() && static_cast<int64_t>(w.routing.remap.size()) != w.router.rows)
        return Status::error("layer ", layer, ": the remap table has ", w.routing.remap.size(), " entries for ",
                             w.router.rows, " router rows");
      for (int32_t slot : w.routing.remap)
        if (slot < 0 || slot >= slots)
          return Status::error("layer ", layer, ": remap entry ", slot, " is not an expert slot [0, ", slots, ")");
    }
    return Status::success();
  }

  Status loadExpert(int64_t layer, int64_t slot, MlpWeights &out) override {
    return loadExpertAt(layer, slot, out, description.nestedLow.count({layer, slot}) > 0);
  }

  Status loadNestedLow(int64_t layer, int64_t slot, MlpWeights &out) override {
    if (layer >= 0 && layer < static_cast<int64_t>(description.layers.size()) && slot >= 0 &&
        slot < static_cast<int64_t>(description.layers[static_cast<size_t>(layer)].experts.size())) {
      const ExpertEntry &expert = description.layers[static_cast<size_t>(layer)].experts[static_cast<size_t>(slot)];
      for (const TensorRef *matrix : matricesOf(expert)) {
        std::optional<quant::WeightFormat> format = quant::parseWeightFormat(matrix->format);
        if (!format || !format->nested)
          return Status::error("tensor '", matrix->name, "' (layer ", layer, " expert ", expert.id, ") is ",
                               matrix->format.empty() ? "not quantised" : matrix->format,
                               ", not nested: its low bits are not stored (moe-quantize nested-bits)");
      }
    }
    return loadExpertAt(layer, slot, out, true);
  }

  /// The expert, its nested matrices at their low bits or high.
  Status loadExpertAt(int64_t layer, int64_t slot, MlpWeights &out, bool low) {
    if (layer < 0 || layer >= static_cast<int64_t>(description.layers.size()) || slot < 0 ||
        slot >= static_cast<int64_t>(description.layers[static_cast<size_t>(layer)].experts.size()))
      return Status::error("layer ", layer, " has no routed expert slot ", slot);
    const ExpertEntry &expert = description.layers[static_cast<size_t>(layer)].experts[static_cast<size_t>(slot)];
    struct Precision {
      bool &low;
      ~Precision() { low = false; }
    } precision{nestedLow = low};
    MOE_RETURN_IF_ERROR(loadMatrix(expert.gate, out.gate));
    MOE_RETURN_IF_ERROR(loadMatrix(expert.up, out.up));
    MOE_RETURN_IF_ERROR(loadMatrix(expert.down, out.down));
    if (!expert.lowRank.empty()) {
      // Factored: {gate a, gate b, up a, up b, down a, down b}.
      out.lowRank.resize(6);
      out.lowRank[0] = std::move(out.gate);
      out.lowRank[2] = std::move(out.up);
      out.lowRank[4] = std::move(out.down);
      out.gate = Matrix();
      out.up = Matrix();
      out.down = Matrix();
      for (size_t f = 0; f < 3; ++f)
        MOE_RETURN_IF_ERROR(loadMatrix(expert.lowRank[f], out.lowRank[2 * f + 1]));
      return Status::success();
    }
    // A split expert's parts: each a gated MLP over its own neurons, the
    // widths adding up to the expert's.
    int64_t width = out.gate.rows;
    for (const ExpertPart &part : expert.moreParts) {
      MlpWeights &loaded = out.moreParts.emplace_back();
      MOE_RETURN_IF_ERROR(loadMatrix(part.gate, loaded.gate));
      MOE_RETURN_IF_ERROR(loadMatrix(part.up, loaded.up));
      MOE_RETURN_IF_ERROR(loadMatrix(part.down, loaded.down));
      const MlpWeights &first = out;
      if (loaded.gate.rows != part.width || loaded.up.rows != part.width || loaded.down.cols != part.width ||
          loaded.gate.cols != first.gate.cols || loaded.up.cols != first.up.cols || loaded.down.rows != first.down.rows)
        return Status::error("layer ", layer, " expert ", expert.id, ": a part of width ", part.width, " has gate ",
                             loaded.gate.rows, "x", loaded.gate.cols, ", up ", loaded.up.rows, "x", loaded.up.cols,
                             ", down ", loaded.down.rows, "x", loaded.down.cols);
      width += part.width;
    }
    if (!expert.moreParts.empty() && width != expert.width)
      return Status::error("layer ", layer, " expert ", expert.id, ": its parts have ", width, " neurons, the expert ",
                           expert.width);
    return Status::success();
  }

  /// The dtype and size readRaw would return, without reading the bytes.
  Status rawSize(const TensorRef &tensor, DType &dtype, uint64_t &bytes) {
    if (!tensor.scaleKey.empty()) {
      dtype = DType::F32;
      bytes = static_cast<uint64_t>(numElements(tensor.shape)) * sizeof(float);
      return Status::success();
    }
    Located where;
    MOE_RETURN_IF_ERROR(locate(tensor, where));
    dtype = where.dtype;
    bytes = where.bytes;
    return Status::success();
  }

  Status readRaw(const TensorRef &tensor, DType &dtype, std::vector<uint8_t> &bytes) {
    if (tensor.scaleKey.empty()) {
      const SafetensorsFile *file;
      const TensorInfo *info;
      MOE_RETURN_IF_ERROR(readBytes(tensor, dtype, bytes, file, info));
      if (file)
        file->releasePages(*info);
      return Status::success();
    }
    std::vector<float> values;
    std::vector<uint8_t> raw;
    MOE_RETURN_IF_ERROR(loadF32(tensor, dtype, values, raw, false));
    dtype = DType::F32;
    bytes.resize(values.size() * sizeof(float));
    std::memcpy(bytes.data(), values.data(), bytes.size());
    return Status::success();
  }

private:
  /// The raw bytes and dtype of `tensor`; `file`/`info` are set for
  /// unsliced source tensors (whose pages the caller releases).
  /// Where `tensor`'s stored bytes are, their dtype and size, without
  /// reading them.
  struct Located {
    const StoredTensor *stored = nullptr;  ///< In the WeightStore.
    const SafetensorsFile *file = nullptr; ///< In a source file...
    const TensorInfo *info = nullptr;
    DType dtype = DType::U8;
    uint64_t bytes = 0;
  };
  Status locate(const TensorRef &tensor, Located &where) {
    where = Located();
    if (tensor.source == kPackageSource) {
      if (!description.package || tensor.offset + tensor.size > description.package->size)
        return Status::error("tensor '", tensor.name, "' lies outside the package");
      where.dtype = tensor.format.empty() ? tensor.dtype : DType::U8;
      where.bytes = tensor.size;
      return Status::success();
    }
    if (tensor.source < 0) {
      if (!store) {
        if (description.store.empty())
          return Status::error("tensor '", tensor.name, "' is in the WeightStore, but the model names none");
        Expected<std::unique_ptr<WeightStore>> opened = WeightStore::open(description.store, /*create=*/false);
        if (!opened)
          return opened.status();
        store = opened.take();
      }
      where.stored = store->find(tensor.key);
      if (!where.stored && store->ignoredTailBytes() > 0)
        return Status::error(store->path(), ": tensor '", tensor.key, "' not in the weight store, which ends in an ",
                             "incomplete record (", store->ignoredTailBytes(),
                             " bytes) left by a writer that was stopped mid-write (or a truncated copy): run the "
                             "pass that wrote '",
                             tensor.name, "' again");
      if (!where.stored)
        return Status::error(store->path(), ": tensor '", tensor.key, "' not in the weight store (it holds ",
                             store->keys().size(), " tensors); the module '", tensor.name,
                             "' refers to belongs with another store: was the store replaced, or the module moved "
                             "without it?");
      where.dtype = where.stored->dtype;
      where.bytes = where.stored->byteSize;
      return Status::success();
    }
    if (tensor.source >= static_cast<int64_t>(description.sources.size()))
      return Status::error("tensor '", tensor.name, "': source ", tensor.source, " out of range");
    Expected<const SafetensorsFile *> opened = source(tensor.source);
    if (!opened)
      return opened.status();
    where.file = *opened;
    where.info = where.file->find(tensor.key);
    if (!where.info)
      return Status::error(where.file->path(), ": tensor '", tensor.key, "' not found");
    where.dtype = where.info->dtype;
    where.bytes = where.info->byteSize();
    if (!tensor.slice.empty() && tensor.slice.size() == 4 && where.info->shape.size() == 3) {
      // {index, first row, rows, transposed}: rows of length A (transposed) or B.
      const int64_t rowLength = tensor.slice[3] == 1 ? where.info->shape[1] : where.info->shape[2];
      where.bytes = static_cast<uint64_t>(tensor.slice[2] * rowLength) * dtypeBytes(where.dtype);
    }
    return Status::success();
  }

  /// The raw bytes and dtype of `tensor`; `file`/`info` are set for
  /// unsliced source tensors (whose pages the caller releases).
  Status readBytes(const TensorRef &tensor, DType &dtype, std::vector<uint8_t> &bytes, const SafetensorsFile *&file,
                   const TensorInfo *&info) {
    Located where;
    MOE_RETURN_IF_ERROR(locate(tensor, where));
    dtype = where.dtype;
    file = nullptr;
    info = nullptr;
    if (tensor.source == kPackageSource) {
      const uint8_t *begin = description.package->data + tensor.offset;
      bytes.assign(begin, begin + tensor.size);
      return Status::success();
    }
    if (where.stored)
      return store->read(*where.stored, bytes);
    if (!tensor.slice.empty())
      return readTensorSlice(*where.file, *where.info, tensor.slice, bytes);
    file = where.file;
    info = where.info;
    std::span<const uint8_t> data = file->data(*info);
    bytes.assign(data.begin(), data.end());
    return Status::success();
  }

  Expected<const SafetensorsFile *> source(int64_t index) {
    std::unique_ptr<SafetensorsFile> &file = sources[index];
    if (!file) {
      Expected<std::unique_ptr<SafetensorsFile>> opened =
          SafetensorsFile::open(description.sources[static_cast<size_t>(index)]);
      if (!opened)
        return opened.status();
      file = opened.take();
    }
    return file.get();
  }

  Status loadF32(const TensorRef &tensor, DType &dtype, std::vector<float> &out, std::vector<uint8_t> &bytes,
                 bool keepBf16) {
    const SafetensorsFile *file;
    const TensorInfo *info;
    MOE_RETURN_IF_ERROR(readBytes(tensor, dtype, bytes, file, info));
    if (file)
      file->releasePages(*info);
    const int64_t count = numElements(tensor.shape);
    if (!isFloatDType(dtype))
      return Status::error("tensor '", tensor.name, "' has dtype ", dtypeName(dtype), "; expected a float dtype");
    if (bytes.size() != static_cast<size_t>(count) * dtypeBytes(dtype))
      return Status::error("tensor '", tensor.name, "' holds ", bytes.size() / dtypeBytes(dtype),
                           " elements; its shape ", formatShape(tensor.shape), " needs ", count);
    if (keepBf16 && dtype == DType::BF16)
      return Status::success();
    resizeLarge(out, static_cast<size_t>(count));
    MOE_RETURN_IF_ERROR(convertToF32(dtype, bytes.data(), out.size(), out.data()));
    if (!tensor.scaleKey.empty()) {
      if (tensor.shape.size() != 2)
        return Status::error("tensor '", tensor.name, "': block scales need a matrix");
      TensorRef scale{
          tensor.name + " (scales)", tensor.scaleSource, tensor.scaleKey, {}, fp8ScaleShape(tensor.shape), "", -1};
      DType scaleType;
      std::vector<float> scales;
      std::vector<uint8_t> scaleBytes;
      MOE_RETURN_IF_ERROR(loadF32(scale, scaleType, scales, scaleBytes, false));
      applyFp8BlockScales(out.data(), 0, tensor.shape[0], tensor.shape[1], scales.data());
    }
    return Status::success();
  }

  Status loadVector(const TensorRef &tensor, std::vector<float> &out) {
    DType dtype;
    std::vector<uint8_t> bytes;
    MOE_RETURN_IF_ERROR(loadF32(tensor, dtype, out, bytes, false));
    if (tensor.interleavedHeads > 0)
      MOE_RETURN_IF_ERROR(deinterleave(tensor, out.data(), static_cast<int64_t>(out.size()), 1));
    return Status::success();
  }

  /// Puts rows stored interleaved per head (TensorRef::interleavedHeads)
  /// back in order: stored row h*D + 2i + j is row h*D + j*D/2 + i.
  template <typename T> Status deinterleave(const TensorRef &tensor, T *rows, int64_t count, int64_t width) {
    const int64_t heads = tensor.interleavedHeads, d = heads > 0 ? count / heads : 0;
    if (heads <= 0 || count % heads != 0 || d % 2 != 0)
      return Status::error("tensor '", tensor.name, "': ", count, " rows are not ", heads, " heads of an even size");
    std::vector<T> stored(rows, rows + count * width);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < d / 2; ++i)
        for (int64_t j = 0; j < 2; ++j)
          std::copy_n(stored.data() + (h * d + 2 * i + j) * width, width, rows + (h * d + j * (d / 2) + i) * width);
    return Status::success();
  }

  Status loadQuantized(const TensorRef &tensor, Matrix &out) {
    std::optional<quant::WeightFormat> format = quant::parseWeightFormat(tensor.format);
    if (!format)
      return Status::error("tensor '", tensor.name, "': unknown quantisation format '", tensor.format, "'");
    if (std::string problem = format->checkColumns(out.cols); !problem.empty())
      return Status::error("tensor '", tensor.name, "': ", tensor.format, ": ", problem);
    const size_t expected = format->matrixBytes(out.rows, out.cols);
    auto wrongSize = [&](uint64_t bytes) {
      return Status::error("tensor '", tensor.name, "' holds ", bytes, " bytes; ", format->name(), " of ",
                           formatShape(tensor.shape), " needs ", expected);
    };
    // The codes stay codes (the kernels read them: moec's group formats by
    // integer dot products, ggml's blocks decoded as they go), read in place
    // from a package or GGUF mapping; a simulated model, or rows stored
    // interleaved, get f32 values.
    const bool asValues = description.dequantizeQuantized || tensor.interleavedHeads > 0;
    // Points `out` at codes in the package mapping (`mapped`) or in
    // out.quantStorage. A nested matrix at its low bits is its low part, read
    // in place; at its high bits, the high codes put back together and held.
    auto keep = [&](const uint8_t *codes, bool mapped) {
      if (format->nested && !nestedLow) {
        std::vector<uint8_t> high(format->nested->high.matrixBytes(out.rows, out.cols));
        quant::unnestCodes(*format->nested, codes, out.rows, out.cols, high.data());
        out.quantFormat = format->nested->high;
        out.quantStorage = std::move(high);
        out.quantData = out.quantStorage.data();
        return;
      }
      out.quantFormat = format->nested ? format->nested->low() : format->group;
      out.ggmlType = format->ggml;
      out.quantData = codes;
      if (mapped) {
        out.quantOwner = description.package;
        out.quantMapping = description.package->file.get();
      } else if (format->nested) {
        out.quantStorage.resize(out.quantFormat->matrixBytes(out.rows, out.cols)); // the low part alone
      }
    };
    auto values = [&](const uint8_t *codes) {
      out.data.resize(static_cast<size_t>(out.rows * out.cols));
      format->dequantize(codes, out.rows, out.cols, out.data.data());
      return Status::success();
    };
    if (tensor.source == kPackageSource) {
      if (tensor.size != expected || tensor.offset + tensor.size > description.package->size)
        return wrongSize(tensor.size);
      const uint8_t *codes = description.package->data + tensor.offset;
      if (asValues)
        return values(codes);
      keep(codes, true);
      return Status::success();
    }
    DType dtype;
    std::vector<uint8_t> bytes;
    const SafetensorsFile *file;
    const TensorInfo *info;
    MOE_RETURN_IF_ERROR(readBytes(tensor, dtype, bytes, file, info));
    if (bytes.size() != expected)
      return wrongSize(bytes.size());
    if (asValues)
      return values(bytes.data());
    out.quantStorage = std::move(bytes);
    keep(out.quantStorage.data(), false);
    return Status::success();
  }

  Status loadMatrix(const TensorRef &tensor, Matrix &out) {
    MOE_RETURN_IF_ERROR(loadStoredMatrix(tensor, out));
    if (tensor.interleavedHeads == 0)
      return Status::success();
    if (!out.data.empty())
      return deinterleave(tensor, out.data.data(), out.rows, out.cols);
    if (!out.bf16.empty())
      return deinterleave(tensor, out.bf16.data(), out.rows, out.cols);
    return Status::error("tensor '", tensor.name, "': interleaved rows of quantised codes cannot be put back in place");
  }

  Status loadStoredMatrix(const TensorRef &tensor, Matrix &out) {
    if (tensor.shape.size() != 2)
      return Status::error("tensor '", tensor.name, "' has shape ", formatShape(tensor.shape), "; expected a matrix");
    out.rows = tensor.shape[0];
    out.cols = tensor.shape[1];
    if (!tensor.format.empty())
      return loadQuantized(tensor, out);
    DType dtype;
    std::vector<uint8_t> bytes;
    MOE_RETURN_IF_ERROR(loadF32(tensor, dtype, out.data, bytes, tensor.scaleKey.empty()));
    if (out.data.empty() && dtype == DType::BF16 && out.rows * out.cols > 0) {
      // Keep the bf16 bits: exact, and half the bytes of an f32 copy.
      out.bf16.resize(bytes.size() / 2);
      std::memcpy(out.bf16.data(), bytes.data(), bytes.size());
    }
    return Status::success();
  }

  ModelDescription description;
  bool nestedLow = false; ///< While an expert in description.nestedLow loads.
  std::map<int64_t, std::unique_ptr<SafetensorsFile>> sources;
  std::unique_ptr<WeightStore> store;
};

} // namespace

namespace {

/// Bytes `tensor` takes once loaded (nested: at the given bits).
uint64_t loadedBytes(const TensorRef &tensor, bool low) {
  int64_t count = 1;
  for (int64_t dim : tensor.shape)
    count *= dim;
  if (tensor.format.empty())
    return static_cast<uint64_t>(count) * (tensor.shape.size() == 2 && tensor.dtype == DType::BF16 ? 2 : 4);
  std::optional<quant::WeightFormat> format = quant::parseWeightFormat(tensor.format);
  if (!format || tensor.shape.size() != 2)
    return 0;
  if (format->nested)
    return (low ? format->nested->low() : format->nested->high).matrixBytes(tensor.shape[0], tensor.shape[1]);
  return format->matrixBytes(tensor.shape[0], tensor.shape[1]);
}

} // namespace

NestedPrecisions chooseNestedPrecisions(const ModelDescription &description, uint64_t budgetBytes) {
  NestedPrecisions chosen;
  struct Candidate {
    std::pair<int64_t, int64_t> expert;
    uint64_t saved = 0;
    double error = 0, recorded = 0;
  };
  std::vector<Candidate> candidates;
  // Recorded costs when every nested matrix has one (else none is used).
  bool recorded = true;
  for (const LayerEntry &layer : description.layers)
    for (const ExpertEntry &expert : layer.experts)
      for (const TensorRef *t : matricesOf(expert))
        if (std::optional<quant::WeightFormat> format = quant::parseWeightFormat(t->format);
            format && format->nested && t->nestedCost < 0)
          recorded = false;
  for (size_t l = 0; l < description.layers.size(); ++l) {
    const LayerEntry &layer = description.layers[l];
    for (const auto &[role, tensor] : layer.tensors)
      chosen.highBytes += loadedBytes(tensor, false);
    if (layer.expertBase) // factored experts' base: always loaded, at its high bits
      for (const TensorRef *t : {&layer.expertBase->gate, &layer.expertBase->up, &layer.expertBase->down})
        chosen.highBytes += loadedBytes(*t, false);
    for (size_t e = 0; e < layer.experts.size(); ++e) {
      const std::vector<const TensorRef *> matrices = matricesOf(layer.experts[e]);
      Candidate candidate{{static_cast<int64_t>(l), static_cast<int64_t>(e)}};
      bool nested = false;
      for (const TensorRef *t : matrices) {
        const uint64_t high = loadedBytes(*t, false), low = loadedBytes(*t, true);
        chosen.highBytes += high;
        candidate.saved += high - low;
        std::optional<quant::WeightFormat> format = quant::parseWeightFormat(t->format);
        if (!format || !format->nested)
          continue;
        nested = true;
        candidate.recorded += std::max(t->nestedCost, 0.0);
        // Else what going low costs: the squared difference of the two values.
        if (recorded || !description.package || t->source != kPackageSource ||
            t->offset + format->matrixBytes(t->shape[0], t->shape[1]) > description.package->size)
          continue;
        candidate.error += quant::nestedSquaredDifference(*format->nested, description.package->data + t->offset,
                                                          t->shape[0], t->shape[1]);
      }
      if (nested) {
        ++chosen.nestedExperts;
        candidates.push_back(candidate);
      }
    }
  }
  chosen.bytes = chosen.highBytes;
  chosen.recordedCosts = recorded && !candidates.empty();
  if (chosen.recordedCosts)
    for (Candidate &candidate : candidates)
      candidate.error = candidate.recorded;
  // Cost per byte saved; a non-finite cost (a hostile package's scales) sorts last.
  auto perByte = [](const Candidate &c) {
    const double ratio = c.saved ? c.error / static_cast<double>(c.saved) : INFINITY;
    return std::isfinite(ratio) ? ratio : INFINITY;
  };
  std::stable_sort(candidates.begin(), candidates.end(), [&](const Candidate &a, const Candidate &b) {
    const double x = perByte(a), y = perByte(b);
    return x != y ? x < y : a.expert < b.expert;
  });
  for (const Candidate &candidate : candidates) {
    if (chosen.bytes <= budgetBytes)
      break;
    chosen.low.insert(candidate.expert);
    chosen.bytes -= candidate.saved;
  }
  return chosen;
}

std::unique_ptr<WeightProvider> makeDescriptionWeightProvider(ModelDescription description) {
  return std::make_unique<DescriptionWeightProvider>(std::move(description));
}

TensorReader::TensorReader(ModelDescription description)
    : provider(std::make_unique<DescriptionWeightProvider>(std::move(description))) {}
TensorReader::~TensorReader() = default;

Status TensorReader::read(const TensorRef &tensor, DType &dtype, std::vector<uint8_t> &bytes) {
  return static_cast<DescriptionWeightProvider &>(*provider).readRaw(tensor, dtype, bytes);
}

Status TensorReader::size(const TensorRef &tensor, DType &dtype, uint64_t &bytes) {
  return static_cast<DescriptionWeightProvider &>(*provider).rawSize(tensor, dtype, bytes);
}

} // namespace moe
