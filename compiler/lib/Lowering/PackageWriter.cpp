//===- PackageWriter.cpp - A model description to a .moepkg file ----------===//
//
// Part of moec. The backend's writer of the format the runtime's package
// reader (runtime/lib/Package.cpp) loads; the layout is in
// moe/Runtime/Package.h.
//
//===----------------------------------------------------------------------===//

#include "moe/Lowering/PackageWriter.h"
#include "common/WeightFormat.h"
#include "moe/Support/AtomicFile.h"

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include <cstring>
#include <set>

namespace moe {

using json = nlohmann::json;

namespace {

uint64_t alignUp(uint64_t value) { return (value + kPackageAlignment - 1) / kPackageAlignment * kPackageAlignment; }

/// The manifest's description of tensors and tables (offsets filled in by the caller).
json roleList(const std::vector<std::pair<TensorRole, TensorRef>> &tensors) {
  json list = json::array();
  for (const auto &[role, tensor] : tensors)
    list.push_back({{"role", std::string(tensorRoleName(role))}, {"tensor", tensor.name}});
  return list;
}

/// Every tensor of the description once, in a fixed order.
std::vector<const TensorRef *> allTensors(const ModelDescription &description) {
  std::vector<const TensorRef *> out;
  std::set<std::string> seen;
  auto add = [&](const TensorRef &tensor) {
    if (seen.insert(tensor.name).second)
      out.push_back(&tensor);
  };
  for (const auto &[role, tensor] : description.globals)
    add(tensor);
  for (const LayerEntry &layer : description.layers) {
    for (const auto &[role, tensor] : layer.tensors)
      add(tensor);
    for (const ExpertEntry &expert : layer.experts) {
      add(expert.gate);
      add(expert.up);
      add(expert.down);
      for (const ExpertPart &part : expert.moreParts) {
        add(part.gate);
        add(part.up);
        add(part.down);
      }
      for (const TensorRef &factor : expert.lowRank)
        add(factor);
    }
    if (layer.expertBase) {
      add(layer.expertBase->gate);
      add(layer.expertBase->up);
      add(layer.expertBase->down);
    }
  }
  return out;
}

} // namespace

Status writePackage(const ModelDescription &description, const PackageExtras &extras, const std::string &path) {
  // The manifest with placeholder checksums has the final length (the
  // checksums are fixed-width hex), which fixes the data offset before any
  // blob is read; blobs stream to the file and the real manifest goes last.
  TensorReader reader(description);
  const std::vector<const TensorRef *> tensors = allTensors(description);
  struct Planned {
    DType dtype;
    std::string format;
    uint64_t offset = 0, size = 0, hash = 0;
  };
  std::vector<Planned> plan(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorRef &tensor = *tensors[i];
    plan[i].format = tensor.format;
    if (!tensor.format.empty()) {
      std::optional<quant::WeightFormat> format = quant::parseWeightFormat(tensor.format);
      if (!format)
        return Status::error("tensor '", tensor.name, "': unknown quantisation format '", tensor.format, "'");
      plan[i].dtype = DType::U8;
      plan[i].size = format->matrixBytes(tensor.shape[0], tensor.shape[1]);
    } else {
      // The stored dtype, and the size from the sources' headers: every
      // tensor's bytes are read once, when written.
      MOE_RETURN_IF_ERROR(reader.size(tensor, plan[i].dtype, plan[i].size));
    }
  }

  auto manifest = [&](bool final) {
    json m;
    m["format"] = "moepkg";
    m["version"] = kPackageVersion;
    m["config"] = description.configText;
    m["tokenizer"] = extras.tokenizerJson;
    m["tokenizer_config"] = extras.tokenizerConfigJson;
    json provenance = json::parse(extras.provenanceJson.empty() ? "{}" : extras.provenanceJson, nullptr, false);
    m["provenance"] = provenance.is_discarded() ? json::object() : provenance;
    m["globals"] = roleList(description.globals);
    json layers = json::array();
    for (size_t l = 0; l < description.layers.size(); ++l) {
      const LayerEntry &layer = description.layers[l];
      const LayerSpec &spec = description.spec.layers[l];
      json entry = {{"tensors", roleList(layer.tensors)}, {"experts", json::array()}};
      for (const ExpertEntry &expert : layer.experts) {
        json record = {{"id", expert.id},
                       {"width", expert.width},
                       {"gate", expert.gate.name},
                       {"up", expert.up.name},
                       {"down", expert.down.name}};
        if (expert.origin != expert.id)
          record["origin"] = expert.origin;
        for (const ExpertPart &part : expert.moreParts)
          record["parts"].push_back(
              {{"width", part.width}, {"gate", part.gate.name}, {"up", part.up.name}, {"down", part.down.name}});
        if (!expert.lowRank.empty())
          record["low_rank"] = {
              {"gate", expert.lowRank[0].name}, {"up", expert.lowRank[1].name}, {"down", expert.lowRank[2].name}};
        entry["experts"].push_back(std::move(record));
      }
      if (layer.expertBase)
        entry["expert_base"] = {{"width", layer.expertBase->width},
                                {"gate", layer.expertBase->gate.name},
                                {"up", layer.expertBase->up.name},
                                {"down", layer.expertBase->down.name}};
      entry["num_experts"] = spec.numExperts;
      entry["expert_width"] = spec.expertIntermediateSize;
      if (layer.routing.router) {
        const RouterSpec &router = *layer.routing.router;
        entry["router"] = {{"top_k", router.topK},
                           {"normalize", router.normalizeTopK},
                           {"scaling", router.scalingFactor},
                           {"groups", router.numGroups},
                           {"top_k_groups", router.topKGroups},
                           {"selection", std::string(expertSelectionKey(router.selection))},
                           {"correction_bias", router.correctionBias}};
      }
      entry["remap"] = layer.routing.remap;
      entry["skip_threshold"] = layer.routing.skipThreshold;
      layers.push_back(entry);
    }
    m["layers"] = layers;
    if (!description.taskSets.empty())
      m["task_sets"] = taskSetsToJson(description.taskSets);
    json table = json::object();
    for (size_t i = 0; i < tensors.size(); ++i) {
      json t = {{"shape", tensors[i]->shape},
                {"offset", plan[i].offset},
                {"bytes", plan[i].size},
                {"xxh64", packageChecksumText(final ? plan[i].hash : 0)}};
      if (plan[i].format.empty())
        t["dtype"] = std::string(dtypeName(plan[i].dtype));
      else
        t["format"] = plan[i].format;
      if (tensors[i]->nestedCost >= 0)
        t["nested_cost"] = tensors[i]->nestedCost;
      table[tensors[i]->name] = t;
    }
    m["tensors"] = table;
    return m.dump();
  };

  // Offsets depend on the data offset, which depends on the manifest's
  // length, which depends on the offsets' digits: iterate to a fixed point
  // (the data offset only grows, so this ends in a few rounds).
  uint64_t dataOffset = alignUp(sizeof(PackageHeader)), offset = 0;
  for (int round = 0;; ++round) {
    offset = dataOffset;
    for (Planned &p : plan) {
      p.offset = offset;
      offset = alignUp(offset + p.size);
    }
    const uint64_t needed = alignUp(sizeof(PackageHeader) + manifest(false).size());
    if (needed <= dataOffset)
      break;
    if (round > 16)
      return Status::error(path, ": internal error: the manifest layout does not settle");
    dataOffset = needed;
  }
  // A unique temporary beside `path`, renamed into place once complete:
  // two emits to one path cannot mix their bytes.
  Expected<std::unique_ptr<AtomicFile>> output = AtomicFile::create(path);
  if (!output)
    return output.status();
  AtomicFile &file = **output;
  for (size_t i = 0; i < tensors.size(); ++i) {
    DType dtype;
    std::vector<uint8_t> bytes;
    MOE_RETURN_IF_ERROR(reader.read(*tensors[i], dtype, bytes));
    if (bytes.size() != plan[i].size)
      return Status::error("tensor '", tensors[i]->name, "' holds ", bytes.size(), " bytes, expected ", plan[i].size);
    plan[i].hash = XXH64(bytes.data(), bytes.size(), 0);
    MOE_RETURN_IF_ERROR(file.writeAt(bytes, plan[i].offset));
  }
  const std::string text = manifest(true);
  PackageHeader header{};
  std::memcpy(header.magic, kPackageMagic, 8);
  header.version = kPackageVersion;
  header.endianness = kPackageEndianness;
  header.manifestOffset = sizeof(PackageHeader);
  header.manifestBytes = text.size();
  header.dataOffset = dataOffset;
  header.fileBytes = offset;
  header.manifestHash = XXH64(text.data(), text.size(), 0);
  // Padding between blobs is zeros; the file ends at the last aligned boundary.
  MOE_RETURN_IF_ERROR(file.resize(offset));
  MOE_RETURN_IF_ERROR(file.writeAt({reinterpret_cast<const uint8_t *>(&header), sizeof(header)}, 0));
  MOE_RETURN_IF_ERROR(file.writeAt({reinterpret_cast<const uint8_t *>(text.data()), text.size()}, sizeof(header)));
  return file.commit();
}

} // namespace moe
