//===- Process.h - What this process has used -------------------*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_PROCESS_H
#define MOE_SUPPORT_PROCESS_H

#include <cstddef>
#include <sys/resource.h>

namespace moe {

/// The peak resident set of this process so far, in bytes.
inline size_t peakResidentBytes() {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<size_t>(usage.ru_maxrss) * 1024;
}

} // namespace moe

#endif // MOE_SUPPORT_PROCESS_H
