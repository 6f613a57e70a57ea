//===- DType.h - Element types of checkpoint tensors ------------*- C++ -*-===//
//
// Part of moec. The safetensors element types, declared once in a traits
// table, and their conversion to f32.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_FRONTEND_DTYPE_H
#define MOE_FRONTEND_DTYPE_H

#include "moe/Support/Status.h"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace moe {

/// Element types a checkpoint tensor may have (safetensors dtype strings).
enum class DType : uint8_t {
  Bool,
  U8,
  I8,
  I16,
  U16,
  I32,
  U32,
  I64,
  U64,
  F16,
  BF16,
  F32,
  F64,
  F8E4M3,
  F8E5M2,
};

/// One row of the dtype traits table.
struct DTypeTraits {
  DType dtype;
  std::string_view name; ///< The safetensors string, e.g. "BF16".
  unsigned bytes;        ///< Bytes per element.
  bool isFloat;          ///< Has a conversion to f32.
};

/// The traits of `dtype`.
const DTypeTraits &dtypeTraits(DType dtype);
/// The name used in safetensors headers, e.g. "F8_E4M3".
inline std::string_view dtypeName(DType dtype) { return dtypeTraits(dtype).name; }
inline unsigned dtypeBytes(DType dtype) { return dtypeTraits(dtype).bytes; }
inline bool isFloatDType(DType dtype) { return dtypeTraits(dtype).isFloat; }
/// Parses a safetensors dtype string; nullopt when it is not supported.
std::optional<DType> parseDType(std::string_view name);
/// Comma-separated list of every supported dtype string, for messages.
std::string supportedDTypeList();
/// Element type named by a config.json `torch_dtype`/`dtype` ("bfloat16").
std::optional<DType> parseTorchDType(std::string_view name);

/// Converts `count` elements of float type `dtype` at `source` (any
/// alignment) to f32. Fails for non-float dtypes.
Status convertToF32(DType dtype, const void *source, size_t count, float *destination);

/// Scalar conversions, exposed for kernels and tests.
float halfToFloat(uint16_t bits);
float bfloat16ToFloat(uint16_t bits);
float float8E4M3ToFloat(uint8_t bits);
float float8E5M2ToFloat(uint8_t bits);
/// Round-to-nearest-even conversions from f32, for writers and tests.
uint16_t floatToHalf(float value);
uint16_t floatToBfloat16(float value);

} // namespace moe

#endif // MOE_FRONTEND_DTYPE_H
