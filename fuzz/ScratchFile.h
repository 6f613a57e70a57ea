//===- ScratchFile.h - One temporary file per fuzzer process ----*- C++ -*-===//
//
// Part of moec. Fuzz targets whose code under test reads a path (packages,
// recipes) write each input to the same scratch file.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_FUZZ_SCRATCHFILE_H
#define MOE_FUZZ_SCRATCHFILE_H

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <unistd.h>

/// Writes `size` bytes to this process's scratch file named with `suffix`
/// (e.g. ".moepkg"); returns its path, or empty when it cannot be written.
inline std::string writeScratchFile(const char *suffix, const void *data, size_t size) {
  static const std::string path = [suffix] {
    std::string name = std::string("/tmp/moec-fuzz-XXXXXX") + suffix;
    const int fd = ::mkstemps(name.data(), static_cast<int>(std::string(suffix).size()));
    if (fd >= 0)
      ::close(fd);
    return name;
  }();
  FILE *out = std::fopen(path.c_str(), "wb");
  if (!out)
    return "";
  const bool written = std::fwrite(data, 1, size, out) == size;
  return std::fclose(out) == 0 && written ? path : "";
}

#endif // MOE_FUZZ_SCRATCHFILE_H
