//===- model_config_fuzzer.cpp - libFuzzer: config.json parsing -----------===//
//
// Part of moec. Parses arbitrary text as a config.json; for every accepted
// config, enumerates the expected tensors and counts parameters, which must
// not crash, overflow or exhaust memory.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/ModelSpec.h"
#include "moe/Frontend/ModelSummary.h"

#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  std::string_view text(reinterpret_cast<const char *>(data), size);
  moe::Expected<moe::ModelSpec> spec = moe::ModelSpec::fromConfigText(text, "fuzz/config.json");
  if (!spec)
    return 0;
  moe::ModelSummary summary = moe::summarizeFromConfig(*spec);
  if (summary.totalParameters <= 0 || summary.activeParameters <= 0 ||
      summary.activeParameters > summary.totalParameters)
    std::abort();
  return 0;
}
