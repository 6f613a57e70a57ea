//===- tokenizer_fuzzer.cpp - libFuzzer: tokenizer.json -------------------===//
//
// Part of moec. Reads the input as a tokenizer.json; an accepted tokenizer
// encodes a fixed text and the input itself, and decodes what it encoded.
// Every id it returns must be one of its own.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Tokenizer.h"

#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  std::string_view text(reinterpret_cast<const char *>(data), size);
  moe::Expected<std::unique_ptr<moe::Tokenizer>> tokenizer = moe::Tokenizer::fromJson(text, "fuzz/tokenizer.json");
  if (!tokenizer)
    return 0;
  for (std::string_view input :
       {std::string_view("The jury said, \"caf\xC3\xA9 <s> 12345!\"\n"), text.substr(0, 256)}) {
    moe::Expected<std::vector<int32_t>> ids = (*tokenizer)->encode(input, true);
    if (!ids)
      continue;
    for (int32_t id : *ids)
      if (id < 0 || id >= (*tokenizer)->vocabSize())
        std::abort();
    (void)(*tokenizer)->decode(*ids, false);
  }
  return 0;
}
