//===- Bandwidth.h - The machine's memory bandwidth, measured in-run -*- C++ -*-===//
//
// Part of moec's benchmarks. STREAM-style copy bandwidth (bytes read +
// written per second) and read bandwidth (a sum over the buffer), with
// `threads` threads each over its own slice, best of 5 over 1 GiB buffers,
// so kernels are compared with the limit of the same machine in the same
// run (the machines are shared).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_BENCH_BANDWIDTH_H
#define MOE_BENCH_BANDWIDTH_H

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

namespace moe::bench {

struct Bandwidth {
  double copyGbPerS = 0, readGbPerS = 0;
};

inline Bandwidth memoryBandwidth(unsigned threads) {
  using Clock = std::chrono::steady_clock;
  auto secondsSince = [](Clock::time_point start) {
    return std::chrono::duration<double>(Clock::now() - start).count();
  };
  const size_t count = (size_t(1) << 30) / sizeof(float);
  std::vector<float> source(count, 1.0f), target(count, 0.0f);
  threads = std::max(1u, threads);
  const size_t slice = count / threads;
  std::vector<float> sinks(threads);
  auto parallel = [&](auto &&work) {
    std::vector<std::thread> workers;
    for (unsigned t = 0; t < threads; ++t)
      workers.emplace_back([&, t] { work(t * slice, slice, t); });
    for (std::thread &worker : workers)
      worker.join();
  };
  Bandwidth best;
  for (int r = 0; r < 5; ++r) {
    auto start = Clock::now();
    parallel([&](size_t begin, size_t n, unsigned) {
      std::memcpy(target.data() + begin, source.data() + begin, n * sizeof(float));
    });
    best.copyGbPerS = std::max(best.copyGbPerS, 2.0 * slice * threads * sizeof(float) / secondsSince(start) / 1e9);
    start = Clock::now();
    parallel([&](size_t begin, size_t n, unsigned t) {
      float sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (size_t i = begin; i < begin + n; i += 8)
        for (int j = 0; j < 8; ++j)
          sums[j] += target[i + j];
      sinks[t] = sums[0] + sums[7];
    });
    best.readGbPerS = std::max(best.readGbPerS, 1.0 * slice * threads * sizeof(float) / secondsSince(start) / 1e9);
  }
  return best;
}

} // namespace moe::bench

#endif // MOE_BENCH_BANDWIDTH_H
