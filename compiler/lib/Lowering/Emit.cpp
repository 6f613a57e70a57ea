//===- Emit.cpp - moe module to a .moepkg package -------------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Lowering/Emit.h"
#include "moe/Lowering/History.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Lowering/PackageWriter.h"
#include "moe/Support/File.h"

#include <filesystem>

namespace moe {

Status emitPackage(ir::ModelOp model, const std::string &baseDirectory, const std::string &path,
                   const std::string &provenanceJson) {
  Expected<ModelDescription> description = lowerToDescription(model, baseDirectory);
  if (!description)
    return description.status();
  PackageExtras extras;
  // The module's history (History.h) travels in the provenance, so a
  // report of the package says what the passes decided.
  nlohmann::json provenance = nlohmann::json::parse(provenanceJson.empty() ? "{}" : provenanceJson, nullptr, false);
  if (!provenance.is_object())
    provenance = nlohmann::json::object();
  nlohmann::json history = historyToJson(model);
  provenance["original"] = history["original"];
  provenance["decisions"] = history["decisions"];
  extras.provenanceJson = provenance.dump();
  if (!description->assetDirectory.empty()) {
    auto read = [&](const char *name) {
      std::filesystem::path file = std::filesystem::path(description->assetDirectory) / name;
      if (!std::filesystem::exists(file))
        return std::string();
      Expected<std::string> text = readWholeFile(file.string());
      return text ? text.take() : std::string();
    };
    extras.tokenizerJson = read("tokenizer.json");
    extras.tokenizerConfigJson = read("tokenizer_config.json");
  }
  return writePackage(*description, extras, path);
}

} // namespace moe
