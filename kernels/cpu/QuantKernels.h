//===- QuantKernels.h - CPU kernels over group-wise integer weights -*- C++ -*-===//
//
// Part of moec. Decode (batch 1) multiplies a quantized matrix by an
// activation vector quantized to int8 once per matmul (one f32 scale per
// weight group, as llama.cpp's Q8_K per 256), with integer dot products
// (AVX2 maddubs/madd) and the min folded in through group sums of the
// quantized activation, so the result is exactly w^ . x^. Prefill runs the
// same integer products over several tokens per pass (gemmRows).
// The ISA is chosen once at run time: AVX-512 VNNI (zmm vpdpbusd), else
// AVX-VNNI, else AVX2+FMA+F16C, else scalar.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CPU_QUANTKERNELS_H
#define MOE_KERNELS_CPU_QUANTKERNELS_H

#include "common/QuantFormat.h"

#include <vector>

namespace moe::quant {

/// A quantized [rows, cols] matrix in the layout of QuantFormat.h.
struct QuantMatrixView {
  QuantFormat format;
  const uint8_t *data = nullptr;
  int64_t rows = 0, cols = 0;
  /// 8-bit codes that are two's complement values, q * scale (ggml's Q8_0,
  /// q8_g32_sym's bytes with each code's top bit flipped); false for every
  /// moec format.
  bool signedCodes = false;
  /// The same matrix as row tiles (common/RowTiles.h, packRowTiles), which
  /// the products read instead where rowTilesHelp; null: none.
  const uint8_t *tiles = nullptr;
};

/// An activation vector for integer dot products: int8 values with one f32
/// scale per weight group (zero-padded to whole groups), and the sum of the
/// quantized values over each group (for the min term).
struct QuantizedActivation {
  int64_t cols = 0;
  int group = 0;
  std::vector<int8_t> values;
  std::vector<float> blockScales;
  std::vector<float> groupSums;
};

/// Quantizes x[cols] for a matrix whose format has group `group` (AVX-512
/// where the kernels use it; the same values as the scalar reference).
void quantizeActivation(const float *x, int64_t cols, int group, QuantizedActivation &out);
/// Scalar reference of quantizeActivation.
void quantizeActivationScalar(const float *x, int64_t cols, int group, QuantizedActivation &out);

/// y[r - rowBegin] = row r . x for r in [rowBegin, rowEnd), with the
/// quantized activation (the fast decode kernel; from w.tiles when set).
void gemvRows(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin, int64_t rowEnd, float *y);

/// Prefill: y[t * ldy + (r - rowBegin)] = row r . x[t] for the `count`
/// activations x[0 .. count) and r in [rowBegin, rowEnd): an integer GEMM
/// (AVX-512 VNNI: by row tiles, common/RowTiles.h, laid out once per call
/// unless w.tiles holds them, one vpdpbusd per four codes of 16 rows, eight
/// tokens per pass; other machines: gemvRows token by token). Equals
/// gemvRows up to float summation order.
void gemmRows(const QuantMatrixView &w, const QuantizedActivation *x, int64_t count, int64_t rowBegin, int64_t rowEnd,
              float *y, int64_t ldy);

/// Whether the products read `format` faster from row tiles made once
/// (packRowTiles) than from the stored rows: on AVX-512 VNNI, for 2- and
/// 4-bit codes (the tiles hold their stored bytes, moved).
bool rowTilesHelp(const QuantFormat &format);
/// Lays out w as row tiles: rowTileLayout(w.format, w.rows, w.cols).
/// totalBytes at `out`, packRowTilesReference's bytes.
void packRowTiles(const QuantMatrixView &w, uint8_t *out);

/// Scalar reference of gemvRows with the same activation quantization.
void gemvRowsScalar(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin, int64_t rowEnd, float *y);

/// Rows [rowBegin, rowEnd) dequantized to f32 ([rowEnd - rowBegin, cols]).
void dequantizeRows(const QuantMatrixView &w, int64_t rowBegin, int64_t rowEnd, float *out);

/// The instruction set gemvRows dispatches to: "avx512-vnni", "avx-vnni",
/// "avx2" or "scalar".
const char *kernelIsa();
/// Every instruction set this machine can run, best first.
std::vector<const char *> availableIsas();
/// gemvRows with a chosen instruction set (for tests and benchmarks;
/// falls back to scalar when the machine lacks it).
void gemvRowsWithIsa(const char *isa, const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin,
                     int64_t rowEnd, float *y);

} // namespace moe::quant

#endif // MOE_KERNELS_CPU_QUANTKERNELS_H
