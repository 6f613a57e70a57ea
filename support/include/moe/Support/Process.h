//===- Process.h - What this process has used -------------------*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_PROCESS_H
#define MOE_SUPPORT_PROCESS_H

#include <cstddef>
#include <cstdio>
#include <sys/resource.h>
#include <unistd.h>

namespace moe {

/// The peak resident set of this process so far, in bytes.
inline size_t peakResidentBytes() {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<size_t>(usage.ru_maxrss) * 1024;
}

/// The resident set of this process now, in bytes (0 where /proc is not
/// readable).
inline size_t currentResidentBytes() {
  std::FILE *file = std::fopen("/proc/self/statm", "r");
  if (!file)
    return 0;
  unsigned long long size = 0, resident = 0;
  const int read = std::fscanf(file, "%llu %llu", &size, &resident);
  std::fclose(file);
  return read == 2 ? static_cast<size_t>(resident) * static_cast<size_t>(sysconf(_SC_PAGESIZE)) : 0;
}

} // namespace moe

#endif // MOE_SUPPORT_PROCESS_H
