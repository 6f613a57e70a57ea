//===- write-grouped-variant.cpp - qwen3_moe with other head counts -------===//
//
// Part of moec. Writes a variant of tests/data/hf/qwen3_moe with other
// head counts (tests/unit/cuda/GroupedVariant.h), for the tests that
// compress it into a package:
//
//   write-grouped-variant SOURCE OUT HEADS KV_HEADS HEAD_DIM
//
//===----------------------------------------------------------------------===//

#include "GroupedVariant.h"

#include <cstdlib>
#include <iostream>
#include <string>

int main(int argc, char **argv) {
  if (argc != 6) {
    std::cerr << "usage: write-grouped-variant SOURCE OUT HEADS KV_HEADS HEAD_DIM\n";
    return 2;
  }
  int numbers[3];
  for (int i = 0; i < 3; ++i) {
    char *end = nullptr;
    const long value = std::strtol(argv[3 + i], &end, 10);
    if (end == argv[3 + i] || *end != '\0' || value <= 0 || value > 1024) {
      std::cerr << "write-grouped-variant: '" << argv[3 + i] << "' is not a count from 1 to 1024\n";
      return 2;
    }
    numbers[i] = static_cast<int>(value);
  }
  const moe::Status status = moe::testing::writeGroupedVariant(argv[1], argv[2], numbers[0], numbers[1], numbers[2]);
  if (!status.ok()) {
    std::cerr << "write-grouped-variant: " << status.message() << "\n";
    return 1;
  }
  return 0;
}
