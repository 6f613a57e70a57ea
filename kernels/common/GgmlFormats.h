//===- GgmlFormats.h - llama.cpp's block formats as moec formats -*- C++ -*-===//
//
// Part of moec. ggml's (llama.cpp's) block-quantized types, declared once
// beside moec's own group formats (QuantFormat.h) and written from their
// public description (ggml's documentation and the GGUF specification). A
// matrix row of n values is n / blockSize blocks, one after another; ne[0]
// (the row length) must be a whole number of blocks. The Python `gguf`
// package's dequantization is the oracle: scripts/fixtures/ggml_goldens.py
// writes tests/data/ggml/goldens.safetensors and the unit tests require
// these functions to reproduce it bit for bit.
//
// Value of code q in a block (d, dmin: the block's fp16 scales):
//   Q4_0  32 values:  d * (q - 8),        q 4 bits
//   Q4_1  32 values:  d * q + m,          q 4 bits, m fp16
//   Q5_0  32 values:  d * (q - 16),       q 5 bits (low nibble + 1 bit of qh)
//   Q5_1  32 values:  d * q + m,          q 5 bits
//   Q8_0  32 values:  d * q,              q int8
//   Q2_K 256 values: 16 sub-blocks of 16: (d * sc) * q - dmin * m, sc, m 4 bits, q 2 bits
//   Q3_K 256 values: 16 sub-blocks of 16: (d * (sc - 32)) * (q - 4 * !hbit), sc 6 bits, q 2 + 1 bits
//   Q4_K 256 values:  8 sub-blocks of 32: (d * sc) * q - dmin * m, sc, m 6 bits, q 4 bits
//   Q5_K 256 values:  8 sub-blocks of 32: as Q4_K with a fifth bit of q in qh
//   Q6_K 256 values: 16 sub-blocks of 16: (d * sc) * (q - 32), sc int8, q 4 + 2 bits
// The arithmetic is float32 in exactly that order (no fused multiply-add).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_COMMON_GGMLFORMATS_H
#define MOE_KERNELS_COMMON_GGMLFORMATS_H

#include "common/QuantFormat.h"

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace moe::quant {

/// ggml's type ids (the values GGUF files store).
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  BF16 = 30,
};

/// Values per K-quant super-block.
inline constexpr int kSuperBlock = 256;

struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];
};
struct BlockQ4_1 {
  uint16_t d, m;
  uint8_t qs[16];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ5_1 {
  uint16_t d, m;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
struct BlockQ2_K {
  uint8_t scales[16]; ///< Low nibble: scale, high nibble: min, per 16 values.
  uint8_t qs[64];
  uint16_t d, dmin;
};
struct BlockQ3_K {
  uint8_t hmask[32];
  uint8_t qs[64];
  uint8_t scales[12]; ///< 16 scales of 6 bits.
  uint16_t d;
};
struct BlockQ4_K {
  uint16_t d, dmin;
  uint8_t scales[12]; ///< 8 scales and 8 mins of 6 bits.
  uint8_t qs[128];
};
struct BlockQ5_K {
  uint16_t d, dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
                  sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34,
              "ggml's 32-value block sizes");
static_assert(sizeof(BlockQ2_K) == 84 && sizeof(BlockQ3_K) == 110 && sizeof(BlockQ4_K) == 144 &&
                  sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210,
              "ggml's K-quant super-block sizes");

struct GgmlTraits {
  GgmlType type;
  const char *name;     ///< "q4_0", "q4_k", ... (moec's spelling of the format).
  const char *ggmlName; ///< "Q4_0", "Q4_K", ... (ggml's).
  int blockSize;        ///< Values per block.
  int blockBytes;
  int bits; ///< Nominal bits per code (for budgets and reports).
};
/// The ten block formats, then F32, F16 and BF16 (block size 1).
extern const GgmlTraits kGgmlTraits[13];
/// The traits of `type`, or null for a type moec does not know.
const GgmlTraits *ggmlTraits(GgmlType type);
/// The traits of a block format named "q4_0", "q4_k", ... (F32/F16/BF16 excluded).
const GgmlTraits *ggmlBlockFormat(std::string_view name);
inline bool isGgmlBlockFormat(GgmlType type) {
  return type != GgmlType::F32 && type != GgmlType::F16 && type != GgmlType::BF16;
}

/// The block format of about `bits` per weight for rows of `cols` values:
/// the K-quant of that width when rows are whole super-blocks, else the
/// nearest 32-value format at or above it (Q4_0, Q5_0, Q8_0).
GgmlType ggmlTypeForBits(double bits, int64_t cols);

/// A block format whose bytes are those of a moec group format: Q4_0 is
/// q4_g32_sym, Q4_1 is q4_g32_asym (fp16 scale and min, the same nibble
/// order) and Q8_0 is q8_g32_sym with two's complement codes. The group
/// kernels (cpu/QuantKernels.h) run such rows in place.
struct GgmlGroupLayout {
  QuantFormat format;
  bool signedCodes = false;
};
/// The group layout of `type`, or nullopt when it has none (K-quants, Q5_*).
std::optional<GgmlGroupLayout> ggmlGroupLayout(GgmlType type);

/// Bytes of a row of `n` values (n a multiple of the block size).
size_t ggmlRowBytes(GgmlType type, int64_t n);

/// The values of one block (blockSize of them).
void ggmlDequantizeBlock(GgmlType type, const uint8_t *block, float *out);

/// Scalar reference: `n` values of a row (n a multiple of the block size).
void ggmlDequantizeRow(GgmlType type, const uint8_t *row, int64_t n, float *out);

/// Scalar reference quantizer: `n` values into blocks of `type`. Each
/// block's scales are chosen by a small search that minimises the squared
/// error weighted by `importance` (n values, or null for uniform), then
/// stored as the format stores them (fp16, 4-, 6- or 8-bit sub-block
/// scales), and every code is the nearest under the stored scales.
void ggmlQuantizeRow(GgmlType type, const float *values, int64_t n, uint8_t *out, const float *importance = nullptr);

/// ggmlQuantizeRow over the `rows` rows of a row-major [rows, cols] matrix.
void ggmlQuantizeRows(GgmlType type, const float *values, int64_t rows, int64_t cols, uint8_t *out);

/// The two steps of ggmlQuantizeRow for one block, for GPTQ (whose grid is
/// the format's own quantizer): choose and store the block's scales from
/// `values` (blockSize of them; codes zeroed), then quantize value `index`
/// under the stored scales, writing its code and returning what it stands for.
void ggmlChooseScales(GgmlType type, const float *values, const float *importance, uint8_t *block);
float ggmlQuantizeValue(GgmlType type, uint8_t *block, int index, float value);

} // namespace moe::quant

#endif // MOE_KERNELS_COMMON_GGMLFORMATS_H
