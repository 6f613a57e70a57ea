//===- Threads.h - How many threads moec computes with ----------*- C++ -*-===//
//
// Part of moec. One process-wide number (`--threads N`; default: every
// core), read by the runtime's worker pool, OpenBLAS and the passes that
// quantise matrices in parallel. Set it before the first computation.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_THREADS_H
#define MOE_SUPPORT_THREADS_H

#include <algorithm>
#include <atomic>
#include <thread>

namespace moe {

namespace detail {
inline std::atomic<unsigned> &threadSetting() {
  static std::atomic<unsigned> count{0};
  return count;
}
} // namespace detail

/// 0 restores the default (every core).
inline void setThreadCount(unsigned count) { detail::threadSetting() = count; }

inline unsigned threadCount() {
  const unsigned set = detail::threadSetting();
  return set > 0 ? set : std::max(1u, std::thread::hardware_concurrency());
}

} // namespace moe

#endif // MOE_SUPPORT_THREADS_H
