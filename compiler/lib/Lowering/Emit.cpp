//===- Emit.cpp - moe module to a .moepkg package -------------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Lowering/Emit.h"
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
  extras.provenanceJson = provenanceJson;
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
