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

/// Nested bit widths (one matrix, two precisions): the codes of `high`
/// whose top `lowBits` bits are a complete low() matrix with scales of its
/// own, stored first, so loading that prefix alone gives a usable low-bit
/// matrix; then the codes' remaining bits as a rest() matrix whose group
/// headers are high's. high's codes are (top << rest bits) | rest. Named
/// "<high>_n<lowBits>", e.g. "q4_g32_asym_n2" (high 4 or 8 bits, lowBits
/// half of them).
struct NestedFormat {
  QuantFormat high;
  int lowBits = 2;
  /// Asymmetric even under a symmetric high format: the top bits of a
  /// symmetric code leave its value biased by up to a low step, which only
  /// a fitted offset takes out.
  QuantFormat low() const { return {lowBits, high.group, false, high.scaleType}; }
  QuantFormat rest() const { return {high.bits - lowBits, high.group, high.symmetric, high.scaleType}; }
  std::string name() const { return high.name() + "_n" + std::to_string(lowBits); }
  size_t matrixBytes(int64_t rows, int64_t cols) const {
    return low().matrixBytes(rows, cols) + rest().matrixBytes(rows, cols);
  }
};

/// Nests `highCodes` (a [rows, cols] matrix in format.high): the top bits
/// become the low matrix, whose group scales and mins are the least-squares
/// fit of its codes to `values` (the weights the codes stand for; null: the
/// high matrix's own values), then the remaining bits with high's headers.
/// `out` holds format.matrixBytes(rows, cols).
void nestCodes(const NestedFormat &format, const uint8_t *highCodes, const float *values, int64_t rows, int64_t cols,
               uint8_t *out);
/// The high matrix again (format.high's bytes) from nested bytes.
void unnestCodes(const NestedFormat &format, const uint8_t *nested, int64_t rows, int64_t cols, uint8_t *highCodes);
/// The sum over the matrix of (high value - low value)^2: what running a
/// nested matrix at its low bits changes (the order of --max-memory's
/// choice, and moe-quantize nested-cost's recorded cost).
double nestedSquaredDifference(const NestedFormat &format, const uint8_t *nested, int64_t rows, int64_t cols);

struct WeightFormat {
  std::optional<QuantFormat> group;   ///< moec's group format, or
  std::optional<GgmlType> ggml;       ///< a ggml block format, or
  std::optional<NestedFormat> nested; ///< a nested group format.

  std::string name() const;
  /// Nominal bits per code (a nested format's high bits).
  int bits() const;
  /// Values per scale: the group, or the block (ggml's super-block for K-quants).
  int block() const;
  /// "sym", "asym" (moec, nested too) or "ggml".
  const char *scheme() const;
  /// Bytes of a [rows, cols] matrix (cols a whole number of blocks for ggml).
  size_t matrixBytes(int64_t rows, int64_t cols) const;
  /// Why a matrix of rows of `cols` values cannot be stored, or empty.
  std::string checkColumns(int64_t cols) const;
  /// The values of a [rows, cols] matrix, f32 (a nested one's high values).
  void dequantize(const uint8_t *data, int64_t rows, int64_t cols, float *out) const;
};

/// A format named as name() writes it; nullopt for anything else.
std::optional<WeightFormat> parseWeightFormat(std::string_view name);

} // namespace moe::quant

#endif // MOE_KERNELS_COMMON_WEIGHTFORMAT_H
