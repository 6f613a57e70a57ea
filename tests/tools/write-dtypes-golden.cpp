//===- write-dtypes-golden.cpp - The all-dtypes file, by moec's writer ----===//
//
// Part of moec. Writes tests/data/safetensors/dtypes.json with moec's
// SafetensorsWriter, so the Python safetensors library can load it
// ("theirs loads ours") and later writers can be compared byte for byte.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Safetensors.h"

#include <nlohmann/json.hpp>

#include <cstring>
#include <fstream>
#include <iostream>

using namespace moe;

namespace {

template <typename T> void append(std::vector<uint8_t> &bytes, T value) {
  uint8_t raw[sizeof(T)];
  std::memcpy(raw, &value, sizeof(T));
  bytes.insert(bytes.end(), raw, raw + sizeof(T));
}

/// Exact encoding of `value` in an 8-bit float type, found by search.
uint8_t encodeFloat8(DType dtype, double value) {
  for (int code = 0; code < 256; ++code) {
    float decoded = dtype == DType::F8E4M3 ? float8E4M3ToFloat(static_cast<uint8_t>(code))
                                           : float8E5M2ToFloat(static_cast<uint8_t>(code));
    if (decoded == static_cast<float>(value))
      return static_cast<uint8_t>(code);
  }
  return 0xFF;
}

} // namespace

int main(int argc, char **argv) {
  if (argc != 3) {
    std::cerr << "usage: write-dtypes-golden dtypes.json out.safetensors\n";
    return 2;
  }
  std::ifstream input(argv[1]);
  nlohmann::json golden = nlohmann::json::parse(input, nullptr, false);
  if (golden.is_discarded()) {
    std::cerr << argv[1] << ": not JSON\n";
    return 1;
  }
  SafetensorsWriter writer;
  for (auto &[name, spec] : golden.items()) {
    if (name[0] == '_')
      continue;
    DType dtype = *parseDType(spec["dtype"].get<std::string>());
    std::vector<uint8_t> bytes;
    for (const auto &value : spec["values"]) {
      double v = value.get<double>();
      switch (dtype) {
      case DType::F32:
        append(bytes, static_cast<float>(v));
        break;
      case DType::F64:
        append(bytes, v);
        break;
      case DType::F16:
        append(bytes, floatToHalf(static_cast<float>(v)));
        break;
      case DType::BF16:
        append(bytes, floatToBfloat16(static_cast<float>(v)));
        break;
      case DType::F8E4M3:
      case DType::F8E5M2:
        append(bytes, encodeFloat8(dtype, v));
        break;
      case DType::Bool:
        append(bytes, static_cast<uint8_t>(v != 0));
        break;
      case DType::U8:
        append(bytes, static_cast<uint8_t>(value.get<int64_t>()));
        break;
      case DType::I8:
        append(bytes, static_cast<int8_t>(value.get<int64_t>()));
        break;
      case DType::I16:
        append(bytes, static_cast<int16_t>(value.get<int64_t>()));
        break;
      case DType::I32:
        append(bytes, static_cast<int32_t>(value.get<int64_t>()));
        break;
      case DType::I64:
        append(bytes, value.get<int64_t>());
        break;
      default:
        std::cerr << name << ": dtype not covered\n";
        return 1;
      }
    }
    Status status = writer.addTensor(name, dtype, {2, 3}, bytes);
    if (!status.ok()) {
      std::cerr << status.message() << "\n";
      return 1;
    }
  }
  writer.setMetadata("format", "pt");
  writer.setMetadata("writer", "moec");
  Status status = writer.write(argv[2]);
  if (!status.ok()) {
    std::cerr << status.message() << "\n";
    return 1;
  }
  return 0;
}
