//===- WeightFormat.h - Any stored weight format of moec ---------*- C++ -*-===//
//
// Part of moec. A quantised tensor is stored either in one of moec's group
// formats (QuantFormat.h: "q4_g128_asym", the CPU and CUDA kernels' layout)
// or in one of llama.cpp's block formats (GgmlFormats.h: "q4_k", which GGUF
// files hold byte for byte). Everything that reads or writes a format by
// name (the dialect's verifier, the lowering, packages, the exporters)
// goes through this one type.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_COMMON_WEIGHTFORMAT_H
#define MOE_KERNELS_COMMON_WEIGHTFORMAT_H

#include "common/GgmlFormats.h"
#include "common/QuantFormat.h"

#include <optional>
#include <string>
#include <string_view>

namespace moe::quant {

struct WeightFormat {
  std::optional<QuantFormat> group; ///< moec's group format, or
  std::optional<GgmlType> ggml;     ///< a ggml block format.

  std::string name() const;
  /// Nominal bits per code.
  int bits() const;
  /// Values per scale: the group, or the block (ggml's super-block for K-quants).
  int block() const;
  /// "sym", "asym" (moec) or "ggml".
  const char *scheme() const;
  /// Bytes of a [rows, cols] matrix (cols a whole number of blocks for ggml).
  size_t matrixBytes(int64_t rows, int64_t cols) const;
  /// Why a matrix of rows of `cols` values cannot be stored, or empty.
  std::string checkColumns(int64_t cols) const;
  /// The values of a [rows, cols] matrix, f32.
  void dequantize(const uint8_t *data, int64_t rows, int64_t cols, float *out) const;
};

/// A format named as name() writes it; nullopt for anything else.
std::optional<WeightFormat> parseWeightFormat(std::string_view name);

} // namespace moe::quant

#endif // MOE_KERNELS_COMMON_WEIGHTFORMAT_H
