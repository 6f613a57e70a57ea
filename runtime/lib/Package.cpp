//===- Package.cpp - The .moepkg file: validate and load ------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Package.h"
#include "common/WeightFormat.h"

#include "moe/Frontend/Safetensors.h"
#include <cmath>

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include <cstdio>
#include <cstring>
#include <set>

namespace moe {

using json = nlohmann::json;

std::string packageChecksumText(uint64_t hash) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(hash));
  return text;
}

bool isPackagePath(const std::string &path) {
  return path.size() > 7 && path.compare(path.size() - 7, 7, ".moepkg") == 0;
}

Expected<OpenedPackage> openPackage(const std::string &path) {
  auto mapping = std::make_shared<PackageMapping>();
  mapping->path = path;
  Expected<std::unique_ptr<MappedFile>> mapped = MappedFile::open(path);
  if (!mapped)
    return mapped.status();
  mapping->file = mapped.take();
  mapping->data = mapping->file->data();
  mapping->size = mapping->file->size();
  const uint64_t fileSize = mapping->size;
  if (fileSize < sizeof(PackageHeader))
    return Status::error(path, ": truncated: ", fileSize, " bytes, shorter than the 64-byte package header");

  PackageHeader header;
  std::memcpy(&header, mapping->data, sizeof(header));
  if (std::memcmp(header.magic, kPackageMagic, 8) != 0)
    return Status::error(path, ": not a moec package (bad magic; expected \"MOEPKG\")");
  if (header.endianness != kPackageEndianness)
    return Status::error(path, ": written with another byte order (endianness mark ", header.endianness, ")");
  if (header.version != kPackageVersion)
    return Status::error(path, ": package version ", header.version, ", this runtime reads version ", kPackageVersion);
  if (header.fileBytes != fileSize)
    return Status::error(path, ": truncated or extended: the header says ", header.fileBytes, " bytes, the file has ",
                         fileSize);
  if (header.manifestOffset != sizeof(PackageHeader) || header.manifestBytes > fileSize ||
      header.manifestOffset + header.manifestBytes > header.dataOffset || header.dataOffset > fileSize)
    return Status::error(path, ": the manifest [", header.manifestOffset, ", +", header.manifestBytes,
                         ") and data offset ", header.dataOffset, " do not fit the file");
  const char *manifestText = reinterpret_cast<const char *>(mapping->data + header.manifestOffset);
  if (XXH64(manifestText, header.manifestBytes, 0) != header.manifestHash)
    return Status::error(path, ": manifest checksum mismatch (the file is corrupted)");
  json m = json::parse(manifestText, manifestText + header.manifestBytes, nullptr, false);
  if (m.is_discarded() || !m.is_object())
    return Status::error(path, ": the manifest is not valid JSON");

  OpenedPackage opened;
  opened.fileBytes = fileSize;
  ModelDescription &description = opened.description;
  description.package = mapping;
  try {
    description.configText = m.at("config").get<std::string>();
    opened.extras.tokenizerJson = m.at("tokenizer").get<std::string>();
    opened.extras.tokenizerConfigJson = m.at("tokenizer_config").get<std::string>();
    opened.extras.provenanceJson = m.at("provenance").dump();
    Expected<ModelSpec> spec = ModelSpec::fromConfigText(description.configText, path + " (manifest config)");
    if (!spec)
      return spec.status();
    description.spec = spec.take();

    std::map<std::string, TensorRef> tensors;
    for (const auto &[name, t] : m.at("tensors").items()) {
      TensorRef ref;
      ref.name = name;
      ref.key = name;
      ref.source = kPackageSource;
      ref.shape = t.at("shape").get<std::vector<int64_t>>();
      ref.offset = t.at("offset").get<uint64_t>();
      ref.size = t.at("bytes").get<uint64_t>();
      if (ref.offset % kPackageAlignment != 0 || ref.offset < header.dataOffset || ref.offset > fileSize ||
          ref.size > fileSize - ref.offset)
        return Status::error(path, ": tensor '", name, "' at [", ref.offset, ", +", ref.size,
                             ") is misaligned or outside the file");
      for (int64_t dim : ref.shape)
        if (dim < 0)
          return Status::error(path, ": tensor '", name, "' has a negative dimension");
      uint64_t expected;
      if (t.contains("format")) {
        ref.format = t.at("format").get<std::string>();
        std::optional<quant::WeightFormat> format = quant::parseWeightFormat(ref.format);
        if (!format)
          return Status::error(path, ": tensor '", name, "' has unknown format '", ref.format, "'");
        if (ref.shape.size() != 2)
          return Status::error(path, ": quantised tensor '", name, "' is not a matrix");
        if (std::string problem = format->checkColumns(ref.shape[1]); !problem.empty())
          return Status::error(path, ": tensor '", name, "': ", ref.format, ": ", problem);
        expected = format->matrixBytes(ref.shape[0], ref.shape[1]);
        if (t.contains("nested_cost")) {
          const json &cost = t.at("nested_cost");
          if (!format->nested || !cost.is_number() || !std::isfinite(cost.get<double>()) || cost.get<double>() < 0)
            return Status::error(path, ": tensor '", name, "' has nested_cost ", cost.dump(),
                                 "; expected a finite number >= 0 on a nested matrix");
          ref.nestedCost = cost.get<double>();
        }
      } else {
        std::optional<DType> dtype = parseDType(t.at("dtype").get<std::string>());
        if (!dtype || !isFloatDType(*dtype))
          return Status::error(path, ": tensor '", name, "' has unsupported dtype '", t.at("dtype").get<std::string>(),
                               "'");
        ref.dtype = *dtype;
        expected = static_cast<uint64_t>(numElements(ref.shape)) * dtypeBytes(*dtype);
      }
      if (ref.size != expected)
        return Status::error(path, ": tensor '", name, "' has ", ref.size, " bytes, its shape and format need ",
                             expected);
      const std::string hash = t.at("xxh64").get<std::string>();
      if (packageChecksumText(XXH64(mapping->data + ref.offset, ref.size, 0)) != hash)
        return Status::error(path, ": tensor '", name, "' checksum mismatch (the file is corrupted)");
      // Checking read every page; what the engine uses it faults back in
      // (from the page cache), the rest need not stay resident: opening a
      // package larger than memory, or after writing one under
      // --max-memory, costs no more than its manifest.
      mapping->file->releasePages(mapping->data + ref.offset, ref.size);
      tensors[name] = std::move(ref);
    }
    auto lookup = [&](const std::string &name) -> Expected<TensorRef> {
      auto it = tensors.find(name);
      if (it == tensors.end())
        return Status::error(path, ": the manifest names tensor '", name, "', which it does not list");
      return it->second;
    };
    auto roles = [&](const json &list, std::vector<std::pair<TensorRole, TensorRef>> &out) -> Status {
      for (const json &entry : list) {
        std::optional<TensorRole> role = parseTensorRole(entry.at("role").get<std::string>());
        if (!role)
          return Status::error(path, ": unknown tensor role '", entry.at("role").get<std::string>(), "'");
        Expected<TensorRef> tensor = lookup(entry.at("tensor").get<std::string>());
        if (!tensor)
          return tensor.status();
        out.emplace_back(*role, tensor.take());
      }
      return Status::success();
    };
    MOE_RETURN_IF_ERROR(roles(m.at("globals"), description.globals));
    const json &layers = m.at("layers");
    if (static_cast<int64_t>(layers.size()) != description.spec.numLayers)
      return Status::error(path, ": the manifest has ", layers.size(), " layers, its config ",
                           description.spec.numLayers);
    description.layers.resize(layers.size());
    for (size_t l = 0; l < layers.size(); ++l) {
      const json &entry = layers[l];
      LayerEntry &layer = description.layers[l];
      MOE_RETURN_IF_ERROR(roles(entry.at("tensors"), layer.tensors));
      // An expert's (or part's) gate, up and down tensors, by name.
      auto matrices = [&](const json &record, TensorRef &gate, TensorRef &up, TensorRef &down) -> Status {
        for (auto [field, target] :
             {std::pair<const char *, TensorRef *>{"gate", &gate}, {"up", &up}, {"down", &down}}) {
          Expected<TensorRef> tensor = lookup(record.at(field).get<std::string>());
          if (!tensor)
            return tensor.status();
          *target = tensor.take();
        }
        return Status::success();
      };
      for (const json &expert : entry.at("experts")) {
        ExpertEntry e;
        e.id = expert.at("id").get<int64_t>();
        e.origin = expert.contains("origin") ? expert.at("origin").get<int64_t>() : e.id;
        e.width = expert.at("width").get<int64_t>();
        MOE_RETURN_IF_ERROR(matrices(expert, e.gate, e.up, e.down));
        if (expert.contains("parts")) {
          for (const json &part : expert.at("parts")) {
            ExpertPart &p = e.moreParts.emplace_back();
            p.width = part.at("width").get<int64_t>();
            MOE_RETURN_IF_ERROR(matrices(part, p.gate, p.up, p.down));
          }
        }
        if (expert.contains("low_rank")) {
          e.lowRank.resize(3);
          MOE_RETURN_IF_ERROR(matrices(expert.at("low_rank"), e.lowRank[0], e.lowRank[1], e.lowRank[2]));
        }
        layer.experts.push_back(std::move(e));
      }
      if (entry.contains("expert_base")) {
        ExpertPart &base = layer.expertBase.emplace();
        base.width = entry.at("expert_base").at("width").get<int64_t>();
        MOE_RETURN_IF_ERROR(matrices(entry.at("expert_base"), base.gate, base.up, base.down));
      }
      LayerSpec &spec = description.spec.layers[l];
      if (spec.mlp == MlpKind::Moe) {
        spec.numExperts = entry.at("num_experts").get<int64_t>();
        spec.expertIntermediateSize = entry.at("expert_width").get<int64_t>();
      }
      if (entry.contains("router")) {
        const json &r = entry.at("router");
        RouterSpec router = description.spec.router;
        router.topK = r.at("top_k").get<int64_t>();
        router.normalizeTopK = r.at("normalize").get<bool>();
        router.scalingFactor = r.at("scaling").get<double>();
        router.numGroups = r.at("groups").get<int64_t>();
        router.topKGroups = r.at("top_k_groups").get<int64_t>();
        router.correctionBias = r.at("correction_bias").get<bool>();
        std::optional<ExpertSelection> selection = parseExpertSelectionKey(r.at("selection").get<std::string>());
        if (!selection)
          return Status::error(path, ": layer ", l, " has unknown selection '", r.at("selection").get<std::string>(),
                               "'");
        router.selection = *selection;
        if (router.topK < 1 || router.numGroups < 1)
          return Status::error(path, ": layer ", l, " has an invalid router (top_k ", router.topK, ")");
        layer.routing.router = router;
      }
      layer.routing.remap = entry.at("remap").get<std::vector<int32_t>>();
      layer.routing.skipThreshold = entry.at("skip_threshold").get<double>();
    }
    if (m.contains("task_sets")) {
      Expected<std::vector<TaskExpertSet>> sets = taskSetsFromJson(m.at("task_sets"), path);
      if (!sets)
        return sets.status();
      description.taskSets = sets.take();
    }
  } catch (const json::exception &error) {
    return Status::error(path, ": the manifest is missing or mistypes a field: ", error.what());
  }
  MOE_RETURN_IF_ERROR(validateDescription(description, path));
  return opened;
}

} // namespace moe
