//===- AtomicFile.h - Outputs that appear whole or not at all ---*- C++ -*-===//
//
// Part of moec. Every file and directory moec writes is built under a
// unique temporary name beside its destination (so two writers of one path
// never share a temporary) and renamed into place once complete: a failed,
// killed or interrupted run leaves the previous output or none, never half
// of one. Temporaries are removed when a write fails, when the object is
// destroyed uncommitted, and on SIGINT/SIGTERM/SIGHUP (Signals.h).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_ATOMICFILE_H
#define MOE_SUPPORT_ATOMICFILE_H

#include "moe/Support/Status.h"

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

/// A file written under `<path>.tmp.XXXXXX` and renamed to `path` by commit().
class AtomicFile {
public:
  static Expected<std::unique_ptr<AtomicFile>> create(const std::string &path);
  ~AtomicFile();
  AtomicFile(const AtomicFile &) = delete;
  AtomicFile &operator=(const AtomicFile &) = delete;

  /// Appends `bytes` at the current end.
  Status write(std::span<const uint8_t> bytes);
  /// Writes `bytes` at `offset` (the file grows as needed).
  Status writeAt(std::span<const uint8_t> bytes, uint64_t offset);
  /// Sets the file's length.
  Status resize(uint64_t bytes);
  /// Flushes to disk and renames the file into place.
  Status commit();
  const std::string &path() const { return finalPath; }

private:
  AtomicFile() = default;
  std::string finalPath, temporaryPath;
  int descriptor = -1;
  uint64_t end = 0;
  bool committed = false;
};

/// Writes `bytes` to `path` through an AtomicFile.
Status writeFileAtomically(const std::string &path, std::span<const uint8_t> bytes);
/// Writes `text` to `path` through an AtomicFile.
Status writeTextAtomically(const std::string &path, std::string_view text);
/// The same for bytes in several pieces, written one after the other.
Status writeChunksAtomically(const std::string &path, const std::vector<std::span<const uint8_t>> &chunks);

/// A directory built under `<path>.tmp.XXXXXX` and published whole by
/// commit(): renamed into place, or, when `path` already exists, exchanged
/// with it in one renameat2(RENAME_EXCHANGE) and the old one removed.
class AtomicDirectory {
public:
  static Expected<std::unique_ptr<AtomicDirectory>> create(const std::string &path);
  ~AtomicDirectory();
  AtomicDirectory(const AtomicDirectory &) = delete;
  AtomicDirectory &operator=(const AtomicDirectory &) = delete;

  /// Where to write the directory's files until commit().
  const std::string &temporary() const { return temporaryPath; }
  Status commit();

private:
  AtomicDirectory() = default;
  std::string finalPath, temporaryPath;
  bool committed = false;
};

} // namespace moe

#endif // MOE_SUPPORT_ATOMICFILE_H
