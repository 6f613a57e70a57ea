//===- MappedFile.h - A whole file mapped read-only -------------*- C++ -*-===//
//
// Part of moec. Every reader of large files (safetensors shards, packages)
// maps them through this one class: weights are used in place, never read
// into memory, and pages of tensors already converted can be given back.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_MAPPEDFILE_H
#define MOE_SUPPORT_MAPPEDFILE_H

#include "moe/Support/Status.h"

#include <cstdint>
#include <memory>
#include <string>

namespace moe {

class MappedFile {
public:
  /// Maps the regular file at `path` (an empty file maps to no bytes).
  static Expected<std::unique_ptr<MappedFile>> open(const std::string &path);
  ~MappedFile();
  MappedFile(const MappedFile &) = delete;
  MappedFile &operator=(const MappedFile &) = delete;

  const std::string &path() const { return filePath; }
  /// The bytes; null for an empty file.
  const uint8_t *data() const { return bytes; }
  uint64_t size() const { return length; }
  /// Lets the kernel drop the whole pages inside [begin, begin + count) of
  /// this mapping (they are read again from the file if touched).
  void releasePages(const uint8_t *begin, uint64_t count) const;

private:
  MappedFile() = default;
  std::string filePath;
  const uint8_t *bytes = nullptr;
  uint64_t length = 0;
};

} // namespace moe

#endif // MOE_SUPPORT_MAPPEDFILE_H
