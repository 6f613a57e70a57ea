//===- package_manifest_fuzzer.cpp - libFuzzer: .moepkg manifest + header -===//
//
// Part of moec. Structure-aware: the input is a package manifest (JSON).
// The harness lays out a package around it (a valid header, the manifest,
// a data region covering every tensor it names) and recomputes the header
// and tensor checksums, so mutations reach the semantic checks behind the
// checksums: roles, shapes, expert tables, routers. A package the loader
// accepts must then run: every layer loads and two tokens go through the
// engine, which must not crash, read out of bounds or hang.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Model.h"
#include "moe/Runtime/Package.h"

#include "ScratchFile.h"

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

constexpr uint64_t kAlignment = 256;
constexpr uint64_t kMaxData = uint64_t(8) << 20;

std::string hex64(uint64_t value) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(value));
  return text;
}

/// Bytes of the data region: small finite bf16/f32 values and codes.
uint8_t dataByte(uint64_t offset) { return static_cast<uint8_t>((offset * 2654435761u >> 13) & 0x3f); }

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  nlohmann::json manifest = nlohmann::json::parse(data, data + size, nullptr, /*allow_exceptions=*/false);
  if (manifest.is_discarded() || !manifest.is_object())
    return 0;
  // Where the data region starts and how long it must be.
  const std::string probe = manifest.dump();
  const uint64_t dataOffset =
      (sizeof(moe::PackageHeader) + probe.size() + 1024 + kAlignment - 1) / kAlignment * kAlignment;
  uint64_t end = dataOffset;
  if (manifest.contains("tensors") && manifest["tensors"].is_object())
    for (auto &[name, tensor] : manifest["tensors"].items()) {
      if (!tensor.is_object() || !tensor.contains("offset") || !tensor["offset"].is_number_unsigned() ||
          !tensor.contains("bytes") || !tensor["bytes"].is_number_unsigned())
        continue;
      const uint64_t offset = tensor["offset"].get<uint64_t>(), bytes = tensor["bytes"].get<uint64_t>();
      if (offset < kMaxData && bytes < kMaxData)
        end = std::max(end, dataOffset + offset + bytes);
    }
  if (end > dataOffset + kMaxData)
    return 0;
  std::vector<uint8_t> file(end);
  for (uint64_t i = dataOffset; i < end; ++i)
    file[i] = dataByte(i);
  // Offsets in the input are relative to the data region; checksums are
  // those of the bytes there.
  if (manifest.contains("tensors") && manifest["tensors"].is_object())
    for (auto &[name, tensor] : manifest["tensors"].items()) {
      if (!tensor.is_object() || !tensor.contains("offset") || !tensor["offset"].is_number_unsigned() ||
          !tensor.contains("bytes") || !tensor["bytes"].is_number_unsigned())
        continue;
      const uint64_t offset = dataOffset + tensor["offset"].get<uint64_t>(), bytes = tensor["bytes"].get<uint64_t>();
      tensor["offset"] = offset;
      if (offset + bytes <= end)
        tensor["xxh64"] = hex64(XXH64(file.data() + offset, bytes, 0));
    }
  const std::string text = manifest.dump();
  if (sizeof(moe::PackageHeader) + text.size() > dataOffset)
    return 0;
  moe::PackageHeader header{};
  std::memcpy(header.magic, "MOEPKG\0\0", 8);
  header.version = moe::kPackageVersion;
  header.endianness = 0x01020304;
  header.manifestOffset = sizeof(moe::PackageHeader);
  header.manifestBytes = text.size();
  header.dataOffset = dataOffset;
  header.fileBytes = end;
  header.manifestHash = XXH64(text.data(), text.size(), 0);
  std::memcpy(file.data(), &header, sizeof(header));
  std::memcpy(file.data() + sizeof(header), text.data(), text.size());

  const std::string path = writeScratchFile(".moepkg", file.data(), file.size());
  if (path.empty())
    return 0;
  moe::Expected<moe::LoadedModel> model = moe::loadModel(path);
  if (!model)
    return 0;
  moe::KvCache cache = model->engine->newCache();
  std::vector<float> logits;
  const int32_t tokens[2] = {0, static_cast<int32_t>(model->spec.vocabSize - 1)};
  (void)model->engine->forward(std::span<const int32_t>(tokens, 2), cache, logits);
  return 0;
}
