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
#include <cstdint>
#include <thread>
#include <vector>

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

/// Runs body(begin, end) on threadCount() threads (fewer when `count` is
/// small), over [0, count) split into contiguous parts; returns when all
/// are done.
template <typename Body> void splitAcrossThreads(int64_t count, const Body &body) {
  const int64_t threads = std::min<int64_t>(threadCount(), count);
  if (threads <= 1) {
    if (count > 0)
      body(int64_t{0}, count);
    return;
  }
  std::vector<std::thread> workers;
  for (int64_t i = 1; i < threads; ++i)
    workers.emplace_back([&body, count, threads, i] { body(count * i / threads, count * (i + 1) / threads); });
  body(int64_t{0}, count / threads);
  for (std::thread &worker : workers)
    worker.join();
}

} // namespace moe

#endif // MOE_SUPPORT_THREADS_H
