//===- first_touch.cpp - What a fresh buffer's first write costs ---------===//
//
// Part of moec. Sequential GPTQ allocates tens of GB of fresh buffers a
// layer (moe/Support/HugePages.h). This prints, as JSON, the rate of
// writing a fresh buffer (std::vector<double>(n, 1.0): allocated and
// first-touched), the same with the storage advised for huge pages first
// (moe::assignLarge), and writing memory already touched (the peer in the
// same run), alternated over rounds; medians in GB/s and their ratios.
//
//   bench/first_touch [--gb 0.5] [--rounds 5]
//
//===----------------------------------------------------------------------===//

#include "moe/Support/HugePages.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace {

double secondsOf(const auto &run) {
  auto start = std::chrono::steady_clock::now();
  run();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

std::string transparentHugePages() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string line;
  std::getline(in, line);
  return line;
}

} // namespace

int main(int argc, char **argv) {
  double gigabytes = 0.5;
  int rounds = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--gb" && i + 1 < argc)
      gigabytes = std::atof(argv[++i]);
    else if (arg == "--rounds" && i + 1 < argc)
      rounds = std::atoi(argv[++i]);
    else {
      std::fprintf(stderr, "usage: first_touch [--gb GB] [--rounds N]\n");
      return 2;
    }
  }
  if (!(gigabytes > 0.01) || rounds < 1) {
    std::fprintf(stderr, "first_touch: --gb must exceed 0.01 and --rounds be positive\n");
    return 2;
  }
  const size_t count = static_cast<size_t>(gigabytes * 1e9 / sizeof(double));
  const double bytes = static_cast<double>(count * sizeof(double));
  std::vector<double> plain, advised, touched;
  std::vector<double> resident(count, 0.0);
  double checksum = 0;
  for (int round = 0; round < rounds; ++round) {
    plain.push_back(bytes / 1e9 / secondsOf([&] {
                      std::vector<double> fresh(count, 1.0);
                      checksum += fresh[count / 2];
                    }));
    advised.push_back(bytes / 1e9 / secondsOf([&] {
                        std::vector<double> fresh;
                        moe::assignLarge(fresh, count, 1.0);
                        checksum += fresh[count / 2];
                      }));
    touched.push_back(bytes / 1e9 / secondsOf([&] {
                        std::fill(resident.begin(), resident.end(), static_cast<double>(round));
                        checksum += resident[count / 2];
                      }));
  }
  const double p = median(plain), a = median(advised), t = median(touched);
  std::printf("{\"bench\": \"first_touch\", \"gigabytes\": %.3f, \"rounds\": %d, \"transparent_hugepage\": \"%s\", "
              "\"fresh_gbps\": %.2f, \"fresh_advised_gbps\": %.2f, \"touched_gbps\": %.2f, "
              "\"advised_over_fresh\": %.2f, \"touched_over_fresh\": %.2f, \"checksum\": %.1f}\n",
              gigabytes, rounds, transparentHugePages().c_str(), p, a, t, a / p, t / p, checksum);
  return 0;
}
