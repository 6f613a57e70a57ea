//===- GgufModel.cpp - A GGUF file moec wrote, as a model description -----===//
//
// Part of moec. The tensors are read in place from the mapped file, as a
// package's are (block formats as their dequantized values); the config and
// tokenizer come from the moec.* keys the exporter writes.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/GgufModel.h"
#include "moe/Runtime/Gguf.h"

#include <nlohmann/json.hpp>

namespace moe {

using quant::GgmlType;

namespace {

Expected<std::string> textKey(const GgufFile &file, const std::string &key, bool required) {
  const GgufValue *value = file.find(key);
  if (!value) {
    if (required)
      return Status::error(file.path(), ": no '", key,
                           "' key: moec runs the GGUF files it wrote (moec export --format gguf), whose config "
                           "and tokenizer it keeps beside llama.cpp's metadata");
    return std::string();
  }
  if (value->type != GgufType::String)
    return Status::error(file.path(), ": '", key, "' must be a string");
  return value->text;
}

/// A reference to `name` in the file, checked against the shape the model
/// expects ([rows, cols] is ne {cols, rows}).
Expected<TensorRef> reference(const GgufFile &file, const std::string &name, const std::vector<int64_t> &shape,
                              uint64_t sliceOffset = 0, uint64_t sliceBytes = 0) {
  const GgufTensorInfo *info = file.tensor(name);
  if (!info)
    return Status::error(file.path(), ": no tensor '", name, "'");
  std::vector<int64_t> ne(shape.rbegin(), shape.rend());
  if (sliceBytes == 0 && info->ne != ne) {
    std::string got, want;
    for (int64_t n : info->ne)
      got += (got.empty() ? "" : ", ") + std::to_string(n);
    for (int64_t n : ne)
      want += (want.empty() ? "" : ", ") + std::to_string(n);
    return Status::error(file.path(), ": tensor '", name, "' has ne {", got, "}, the model needs {", want, "}");
  }
  TensorRef ref;
  ref.name = name;
  ref.source = kPackageSource;
  ref.shape = shape;
  ref.offset = file.fileOffset(*info) + sliceOffset;
  ref.size = sliceBytes ? sliceBytes : info->bytes;
  switch (info->type) {
  case GgmlType::F32:
    ref.dtype = DType::F32;
    break;
  case GgmlType::F16:
    ref.dtype = DType::F16;
    break;
  case GgmlType::BF16:
    ref.dtype = DType::BF16;
    break;
  default:
    ref.format = quant::ggmlTraits(info->type)->name;
    if (shape.size() != 2)
      return Status::error(file.path(), ": tensor '", name, "' is quantised but not a matrix");
  }
  return ref;
}

} // namespace

Expected<OpenedPackage> openGgufModel(const std::string &path) {
  Expected<std::unique_ptr<GgufFile>> opened = GgufFile::open(path);
  if (!opened)
    return opened.status();
  const GgufFile &file = **opened;
  Expected<std::string> config = textKey(file, "moec.config_json", true);
  if (!config)
    return config.status();
  Expected<ModelSpec> spec = ModelSpec::fromConfigText(*config, path + " (moec.config_json)");
  if (!spec)
    return spec.status();
  OpenedPackage out;
  Expected<std::string> tokenizer = textKey(file, "moec.tokenizer_json", false);
  Expected<std::string> tokenizerConfig = textKey(file, "moec.tokenizer_config_json", false);
  if (!tokenizer || !tokenizerConfig)
    return !tokenizer ? tokenizer.status() : tokenizerConfig.status();
  out.extras.tokenizerJson = *tokenizer;
  out.extras.tokenizerConfigJson = *tokenizerConfig;

  ModelDescription &description = out.description;
  description.spec = *spec;
  description.configText = *config;
  auto mapping = std::make_shared<PackageMapping>();
  Expected<std::unique_ptr<MappedFile>> mapped = MappedFile::open(path);
  if (!mapped)
    return mapped.status();
  mapping->file = mapped.take();
  mapping->path = path;
  mapping->data = mapping->file->data();
  mapping->size = mapping->file->size();
  description.package = mapping;
  out.fileBytes = mapping->size;

  const std::string architecture = file.find("general.architecture") ? file.find("general.architecture")->text : "";
  // llama's rope pairs adjacent dimensions: the exporter interleaved each
  // head's rows of q and k, undone when they are loaded.
  const bool interleaved = architecture == "llama";
  std::vector<int64_t> topK;
  if (const GgufValue *used = file.find(architecture + ".expert_used_count"); used && used->type == GgufType::Array)
    topK = used->integers;

  description.layers.resize(static_cast<size_t>(spec->numLayers));
  for (const TensorSpec &tensor : spec->tensors()) {
    if (tensor.expert >= 0 || tensor.role == TensorRole::ExpertGate || tensor.role == TensorRole::ExpertUp ||
        tensor.role == TensorRole::ExpertDown || tensor.role == TensorRole::ExpertGateUpFused ||
        tensor.role == TensorRole::ExpertDownFused)
      continue;
    const char *suffix = ggufRoleName(tensor.role);
    if (!suffix)
      return Status::error(path, ": no GGUF name for role ", tensorRoleName(tensor.role));
    const std::string name = tensor.layer >= 0 ? concat("blk.", tensor.layer, ".", suffix) : std::string(suffix);
    Expected<TensorRef> ref = reference(file, name, tensor.shape);
    if (!ref)
      return ref.status();
    if (interleaved && (tensor.role == TensorRole::QueryProj || tensor.role == TensorRole::QueryBias))
      ref->interleavedHeads = spec->attention.numHeads;
    if (interleaved && (tensor.role == TensorRole::KeyProj || tensor.role == TensorRole::KeyBias))
      ref->interleavedHeads = spec->attention.numKeyValueHeads;
    if (tensor.layer < 0)
      description.globals.emplace_back(tensor.role, *ref);
    else
      description.layers[static_cast<size_t>(tensor.layer)].tensors.emplace_back(tensor.role, *ref);
  }
  // Routed experts: slices of the stacked tensors, in router-row order.
  for (int64_t l = 0; l < spec->numLayers; ++l) {
    const LayerSpec &layerSpec = spec->layers[static_cast<size_t>(l)];
    if (layerSpec.mlp != MlpKind::Moe)
      continue;
    LayerEntry &layer = description.layers[static_cast<size_t>(l)];
    const int64_t experts = layerSpec.numExperts, width = layerSpec.expertIntermediateSize, hidden = spec->hiddenSize;
    const std::string blk = concat("blk.", l, ".");
    std::vector<TensorRef> stacked[3];
    for (int m = 0; m < 3; ++m) {
      const std::string name = blk + (m == 0   ? "ffn_gate_exps.weight"
                                      : m == 1 ? "ffn_up_exps.weight"
                                               : "ffn_down_exps.weight");
      const GgufTensorInfo *info = file.tensor(name);
      const std::vector<int64_t> shape =
          m == 2 ? std::vector<int64_t>{hidden, width} : std::vector<int64_t>{width, hidden};
      if (!info || info->ne != std::vector<int64_t>{shape[1], shape[0], experts})
        return Status::error(path, ": tensor '", name, "' is missing or not {", shape[1], ", ", shape[0], ", ", experts,
                             "}");
      const uint64_t sliceBytes = info->bytes / static_cast<uint64_t>(experts);
      for (int64_t e = 0; e < experts; ++e) {
        Expected<TensorRef> ref = reference(file, name, shape, static_cast<uint64_t>(e) * sliceBytes, sliceBytes);
        if (!ref)
          return ref.status();
        ref->name = concat(name, "[", e, "]");
        stacked[m].push_back(*ref);
      }
    }
    for (int64_t e = 0; e < experts; ++e) {
      ExpertEntry expert;
      expert.id = expert.origin = e;
      expert.width = width;
      expert.gate = stacked[0][static_cast<size_t>(e)];
      expert.up = stacked[1][static_cast<size_t>(e)];
      expert.down = stacked[2][static_cast<size_t>(e)];
      layer.experts.push_back(std::move(expert));
    }
    if (static_cast<size_t>(l) < topK.size() && topK[static_cast<size_t>(l)] != spec->router.topK) {
      RouterSpec router = spec->router;
      router.topK = topK[static_cast<size_t>(l)];
      layer.routing.router = router;
    }
  }
  MOE_RETURN_IF_ERROR(validateDescription(description, path));
  return out;
}

bool isGgufPath(const std::string &path) { return path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0; }

} // namespace moe
