//===- QuantFormat.h - Group-wise integer weight formats, declared once -*- C++ -*-===//
//
// Part of moec. Every quantized weight format of moec (DESIGN.md principle 5,
// STYLE.md rule 8): group-wise integer codes of 2, 3, 4 or 8 bits over the
// input dimension of a [rows, cols] matrix, symmetric or asymmetric, groups
// of 32, 64 or 128, scales in fp16 or bf16. The CPU kernels, the package
// emitter, the passes and the CUDA code all use this one declaration and
// its scalar reference. Plain C++ with no dependencies (valid in CUDA too).
//
// Layout of a quantized matrix: rows one after another; a row is
// ceil(cols / group) groups; a group is a GroupHeader (scale, and min for
// asymmetric formats) followed by group * bits / 8 bytes of codes in blocks
// of 32 codes (32 * bits / 8 bytes each). Inside a block the codes are
// planar, so that a SIMD unpack is a few shifts and masks:
//   8 bits: byte j is code j;
//   4 bits: byte j % 16 holds code j in its low (j < 16) or high nibble;
//   2 bits: byte j % 8 holds code j at bits 2 * (j / 8);
//   3 bits: bytes 0..7 hold the low two bits as the 2-bit layout, bytes
//           8..11 the high bit of code j at bit j % 8 of byte 8 + j / 8.
// A code q stands for q * scale + min (asymmetric) or (q - 2^(bits-1)) *
// scale (symmetric, GPTQ's zero point). The last group of a row is padded
// with the code of 0.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_COMMON_QUANTFORMAT_H
#define MOE_KERNELS_COMMON_QUANTFORMAT_H

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace moe::quant {

enum class ScaleType : uint8_t { F16, BF16 };

/// Per-group header: scale, then (asymmetric formats only) min, each 16 bits.
struct GroupHeader {
  uint16_t scale;
  uint16_t min;
};
static_assert(sizeof(GroupHeader) == 4, "two 16-bit values");

struct QuantFormat {
  int bits = 4;
  int group = 128;
  bool symmetric = false;
  ScaleType scaleType = ScaleType::F16;

  /// "q4_g128_asym", with "_bf16" appended for bf16 scales.
  std::string name() const;
  /// Bytes of a group's header and codes.
  constexpr size_t headerBytes() const { return symmetric ? 2 : 4; }
  constexpr size_t codeBytes() const { return static_cast<size_t>(group) * static_cast<size_t>(bits) / 8; }
  constexpr size_t groupBytes() const { return headerBytes() + codeBytes(); }
  constexpr int64_t groupsPerRow(int64_t cols) const { return (cols + group - 1) / group; }
  constexpr size_t rowBytes(int64_t cols) const { return static_cast<size_t>(groupsPerRow(cols)) * groupBytes(); }
  constexpr size_t matrixBytes(int64_t rows, int64_t cols) const { return static_cast<size_t>(rows) * rowBytes(cols); }
  constexpr int maxCode() const { return (1 << bits) - 1; }
  constexpr int zeroPoint() const { return 1 << (bits - 1); }
  bool operator==(const QuantFormat &other) const {
    return bits == other.bits && group == other.group && symmetric == other.symmetric && scaleType == other.scaleType;
  }
};

/// How codes of one width are packed: `codesPerPack` codes in `bytesPerPack` bytes.
struct BitsTraits {
  int bits;
  int codesPerPack;
  int bytesPerPack;
};
/// The traits of 2, 3, 4 and 8 bits (the supported widths), in that order.
inline constexpr BitsTraits kBitsTraits[] = {{2, 4, 1}, {3, 8, 3}, {4, 2, 1}, {8, 1, 1}};
inline constexpr int kGroupSizes[] = {32, 64, 128};
/// Traits of `bits`, or null when unsupported.
const BitsTraits *bitsTraits(int bits);

// Sizes of familiar formats (ggml's Q4_0, Q4_1 and Q8_0 have the same bytes per 32 weights).
static_assert(QuantFormat{4, 32, true}.groupBytes() == 18, "q4_g32_sym = 18 bytes per 32 weights");
static_assert(QuantFormat{4, 32, false}.groupBytes() == 20, "q4_g32_asym = 20 bytes per 32 weights");
static_assert(QuantFormat{8, 32, true}.groupBytes() == 34, "q8_g32_sym = 34 bytes per 32 weights");
static_assert(QuantFormat{3, 128, false}.groupBytes() == 52, "q3_g128_asym = 52 bytes per 128 weights");

/// Parses a name that name() writes; nullopt for anything else.
std::optional<QuantFormat> parseQuantFormat(std::string_view name);
/// Why `format` is not supported, or empty when it is.
std::string validateQuantFormat(const QuantFormat &format);

/// Scale and min conversions of the 16-bit header fields.
float scaleToFloat(uint16_t bits, ScaleType type);
uint16_t floatToScale(float value, ScaleType type);

/// Codes per planar block.
inline constexpr int kCodeBlock = 32;

/// Reads code `index` of a group's packed codes.
int unpackCode(const uint8_t *codes, int bits, int64_t index);
/// Writes code `index` (codes must start zeroed).
void packCode(uint8_t *codes, int bits, int64_t index, int code);

/// Scalar reference: round-to-nearest quantization of a row-major
/// [rows, cols] f32 matrix into `out` (format.matrixBytes(rows, cols) bytes).
void quantizeReference(const QuantFormat &format, const float *matrix, int64_t rows, int64_t cols, uint8_t *out);
/// Scalar reference: the values the codes stand for, [rows, cols] f32.
void dequantizeReference(const QuantFormat &format, const uint8_t *data, int64_t rows, int64_t cols, float *out);
/// Quantizes one group of `count` (<= group) values with the given scale
/// and min (min ignored for symmetric formats) into packed `codes`.
void quantizeGroupWith(const QuantFormat &format, const float *values, int64_t count, float scale, float min,
                       uint8_t *codes);

} // namespace moe::quant

#endif // MOE_KERNELS_COMMON_QUANTFORMAT_H
