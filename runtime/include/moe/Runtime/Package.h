//===- Package.h - The .moepkg file: layout, validate, load -----*- C++ -*-===//
//
// Part of moec. One versioned file (DESIGN.md "Package"):
//
//   [0, 64)          PackageHeader: magic "MOEPKG\0\0", version, endianness
//                    mark, manifest offset and length, data offset, file size,
//                    XXH64 of the manifest
//   [64, ...)        JSON manifest: config.json, tokenizer files, the model
//                    description (globals, per-layer tensors by role, expert
//                    tables with widths, routing with remap and skip
//                    threshold), per tensor its dtype or quant format, shape,
//                    offset, size and XXH64, and compression provenance
//   [data, end)      tensor blobs, each at a 256-byte boundary, quantised
//                    ones in the kernels' layout (kernels/common)
//
// The backend writes it (moe/Lowering/PackageWriter.h) under a unique
// temporary name and renames it; the same description gives the same
// bytes. Loading validates everything before the model runs, and quantised
// blobs are used in place from the mapping.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_PACKAGE_H
#define MOE_RUNTIME_PACKAGE_H

#include "moe/Runtime/Description.h"

#include <cstdint>
#include <string>

namespace moe {

constexpr uint32_t kPackageVersion = 1;
constexpr uint64_t kPackageAlignment = 256;
constexpr char kPackageMagic[8] = {'M', 'O', 'E', 'P', 'K', 'G', 0, 0};
constexpr uint32_t kPackageEndianness = 0x01020304;

struct PackageHeader {
  char magic[8];       ///< "MOEPKG\0\0"
  uint32_t version;    ///< kPackageVersion
  uint32_t endianness; ///< 0x01020304 as written by a little-endian machine
  uint64_t manifestOffset;
  uint64_t manifestBytes;
  uint64_t dataOffset;
  uint64_t fileBytes;
  uint64_t manifestHash; ///< XXH64 (seed 0) of the manifest bytes
  uint64_t reserved;
};
static_assert(sizeof(PackageHeader) == 64, "the header is 64 bytes");

/// What a package carries besides the tensors.
struct PackageExtras {
  std::string tokenizerJson;       ///< tokenizer.json text, or empty
  std::string tokenizerConfigJson; ///< tokenizer_config.json text, or empty
  std::string provenanceJson;      ///< A JSON object (passes, options, source), or empty
};

struct OpenedPackage {
  ModelDescription description;
  PackageExtras extras;
  uint64_t fileBytes = 0;
};

/// Maps and validates `path` (header, manifest, every blob's bounds, size
/// and checksum) and returns the description the runtime runs.
Expected<OpenedPackage> openPackage(const std::string &path);

/// A blob's or manifest's XXH64 as the manifest spells it (16 hex digits).
std::string packageChecksumText(uint64_t hash);

/// True when `path` names a package file (by its extension).
bool isPackagePath(const std::string &path);

} // namespace moe

#endif // MOE_RUNTIME_PACKAGE_H
