//===- Package.cpp - The .moepkg file: write, validate, load --------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Package.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Support/AtomicFile.h"

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <set>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moe {

using json = nlohmann::json;

PackageMapping::~PackageMapping() {
  if (data)
    munmap(const_cast<uint8_t *>(data), size);
}

namespace {

constexpr char kMagic[8] = {'M', 'O', 'E', 'P', 'K', 'G', 0, 0};
constexpr uint32_t kEndianness = 0x01020304;

uint64_t alignUp(uint64_t value) { return (value + kPackageAlignment - 1) / kPackageAlignment * kPackageAlignment; }

std::string hex64(uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(value));
  return text;
}

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
    }
  }
  return out;
}

} // namespace

bool isPackagePath(const std::string &path) {
  return path.size() > 7 && path.compare(path.size() - 7, 7, ".moepkg") == 0;
}

Status writePackage(const ModelDescription &description, const PackageExtras &extras, const std::string &path) {
  // The manifest with placeholder checksums has the final length (the
  // checksums are fixed-width hex), which fixes the data offset before any
  // blob is read; blobs stream to the file and the real manifest goes last.
  // Never write a package that openPackage would reject.
  MOE_RETURN_IF_ERROR(validateDescription(description, path));
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
      std::optional<quant::QuantFormat> format = quant::parseQuantFormat(tensor.format);
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
        json record = {{"id", expert.id}, {"width", expert.width}, {"gate", expert.gate.name},
                       {"up", expert.up.name}, {"down", expert.down.name}};
        for (const ExpertPart &part : expert.moreParts)
          record["parts"].push_back({{"width", part.width}, {"gate", part.gate.name}, {"up", part.up.name},
                                     {"down", part.down.name}});
        entry["experts"].push_back(std::move(record));
      }
      entry["num_experts"] = spec.numExperts;
      entry["expert_width"] = spec.expertIntermediateSize;
      if (layer.routing.router) {
        const RouterSpec &router = *layer.routing.router;
        entry["router"] = {{"top_k", router.topK}, {"normalize", router.normalizeTopK},
                           {"scaling", router.scalingFactor}, {"groups", router.numGroups},
                           {"top_k_groups", router.topKGroups},
                           {"selection", std::string(expertSelectionKey(router.selection))},
                           {"correction_bias", router.correctionBias}};
      }
      entry["remap"] = layer.routing.remap;
      entry["skip_threshold"] = layer.routing.skipThreshold;
      layers.push_back(entry);
    }
    m["layers"] = layers;
    json table = json::object();
    for (size_t i = 0; i < tensors.size(); ++i) {
      json t = {{"shape", tensors[i]->shape}, {"offset", plan[i].offset}, {"bytes", plan[i].size},
                {"xxh64", hex64(final ? plan[i].hash : 0)}};
      if (plan[i].format.empty())
        t["dtype"] = std::string(dtypeName(plan[i].dtype));
      else
        t["format"] = plan[i].format;
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
  std::memcpy(header.magic, kMagic, 8);
  header.version = kPackageVersion;
  header.endianness = kEndianness;
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

Expected<OpenedPackage> openPackage(const std::string &path) {
  auto mapping = std::make_shared<PackageMapping>();
  mapping->path = path;
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0)
    return Status::error(path, ": cannot open: ", std::strerror(errno));
  struct stat info;
  if (fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    return Status::error(path, ": not a regular file");
  }
  const uint64_t fileSize = static_cast<uint64_t>(info.st_size);
  if (fileSize < sizeof(PackageHeader)) {
    ::close(fd);
    return Status::error(path, ": truncated: ", fileSize, " bytes, shorter than the 64-byte package header");
  }
  void *address = mmap(nullptr, fileSize, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (address == MAP_FAILED)
    return Status::error(path, ": cannot map: ", std::strerror(errno));
  mapping->data = static_cast<const uint8_t *>(address);
  mapping->size = fileSize;

  PackageHeader header;
  std::memcpy(&header, mapping->data, sizeof(header));
  if (std::memcmp(header.magic, kMagic, 8) != 0)
    return Status::error(path, ": not a moec package (bad magic; expected \"MOEPKG\")");
  if (header.endianness != kEndianness)
    return Status::error(path, ": written with another byte order (endianness mark ", header.endianness, ")");
  if (header.version != kPackageVersion)
    return Status::error(path, ": package version ", header.version, ", this runtime reads version ",
                         kPackageVersion);
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
        std::optional<quant::QuantFormat> format = quant::parseQuantFormat(ref.format);
        if (!format)
          return Status::error(path, ": tensor '", name, "' has unknown format '", ref.format, "'");
        if (ref.shape.size() != 2)
          return Status::error(path, ": quantised tensor '", name, "' is not a matrix");
        expected = format->matrixBytes(ref.shape[0], ref.shape[1]);
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
      if (hex64(XXH64(mapping->data + ref.offset, ref.size, 0)) != hash)
        return Status::error(path, ": tensor '", name, "' checksum mismatch (the file is corrupted)");
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
        for (auto [field, target] : {std::pair<const char *, TensorRef *>{"gate", &gate}, {"up", &up},
                                     {"down", &down}}) {
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
        e.width = expert.at("width").get<int64_t>();
        MOE_RETURN_IF_ERROR(matrices(expert, e.gate, e.up, e.down));
        if (expert.contains("parts")) {
          for (const json &part : expert.at("parts")) {
            ExpertPart &p = e.moreParts.emplace_back();
            p.width = part.at("width").get<int64_t>();
            MOE_RETURN_IF_ERROR(matrices(part, p.gate, p.up, p.down));
          }
        }
        layer.experts.push_back(std::move(e));
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
  } catch (const json::exception &error) {
    return Status::error(path, ": the manifest is missing or mistypes a field: ", error.what());
  }
  MOE_RETURN_IF_ERROR(validateDescription(description, path));
  return opened;
}

} // namespace moe
