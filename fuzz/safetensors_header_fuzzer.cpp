//===- safetensors_header_fuzzer.cpp - libFuzzer: safetensors headers -----===//
//
// Part of moec. Feeds arbitrary bytes to the header parser as a whole file
// and checks the invariants of every header it accepts.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Safetensors.h"

#include <cstdlib>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  moe::Expected<moe::SafetensorsHeader> header = moe::parseSafetensorsHeader(data, size, "fuzz.safetensors");
  if (!header)
    return 0;
  uint64_t bufferSize = size - header->dataOffset;
  uint64_t covered = 0;
  for (const moe::TensorInfo &tensor : header->tensors) {
    if (tensor.dataEnd > bufferSize || tensor.dataBegin > tensor.dataEnd ||
        tensor.byteSize() != static_cast<uint64_t>(tensor.numElements()) * moe::dtypeBytes(tensor.dtype) ||
        header->find(tensor.name) != &tensor)
      std::abort();
    covered += tensor.byteSize();
  }
  if (covered != bufferSize)
    std::abort(); // accepted headers tile the buffer exactly
  return 0;
}
