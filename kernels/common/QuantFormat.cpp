//===- QuantFormat.cpp - Group-wise integer weight formats ----------------===//
//
// Part of moec. The scalar reference every kernel is tested against.
//
//===----------------------------------------------------------------------===//

#include "common/QuantFormat.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace moe::quant {

namespace {

float halfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
  if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else { // subnormal
      exponent = 127 - 15 + 1;
      while (!(mantissa & 0x400)) {
        mantissa <<= 1;
        --exponent;
      }
      bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
    }
  } else if (exponent == 31) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
  }
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

uint16_t floatToHalfBits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  const uint32_t sign = (bits >> 16) & 0x8000;
  const int32_t exponent = static_cast<int32_t>((bits >> 23) & 0xff) - 127 + 15;
  uint32_t mantissa = bits & 0x7fffff;
  if (((bits >> 23) & 0xff) == 0xff)
    return static_cast<uint16_t>(sign | 0x7c00 | (mantissa ? 0x200 : 0));
  if (exponent >= 31)
    return static_cast<uint16_t>(sign | 0x7c00);
  if (exponent <= 0) {
    if (exponent < -10)
      return static_cast<uint16_t>(sign);
    mantissa |= 0x800000;
    const int shift = 14 - exponent;
    uint32_t half = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (half & 1)))
      ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
  const uint32_t rest = mantissa & 0x1fff;
  if (rest > 0x1000 || (rest == 0x1000 && (half & 1)))
    ++half; // may carry into the exponent, which rounds up correctly
  return static_cast<uint16_t>(half);
}

/// `value` in 16 bits, rounded to nearest and then moved one step up (or
/// down) when rounding went the other way.
uint16_t roundedScale(float value, ScaleType type, bool up) {
  uint16_t bits = floatToScale(value, type);
  const float stored = scaleToFloat(bits, type);
  if (std::isfinite(value) && (up ? stored < value : stored > value)) {
    // For sign-magnitude 16-bit floats, one more in the magnitude moves away from zero.
    const bool negative = (bits & 0x8000) != 0;
    const bool awayFromZero = up != negative;
    if (awayFromZero)
      bits = static_cast<uint16_t>(bits + 1);
    else if ((bits & 0x7fff) != 0)
      bits = static_cast<uint16_t>(bits - 1);
    else
      bits = static_cast<uint16_t>(0x8001); // the smallest negative subnormal
  }
  return bits;
}

} // namespace

const BitsTraits *bitsTraits(int bits) {
  for (const BitsTraits &traits : kBitsTraits)
    if (traits.bits == bits)
      return &traits;
  return nullptr;
}

std::string QuantFormat::name() const {
  std::string out = "q" + std::to_string(bits) + "_g" + std::to_string(group) + (symmetric ? "_sym" : "_asym");
  if (scaleType == ScaleType::BF16)
    out += "_bf16";
  return out;
}

std::optional<QuantFormat> parseQuantFormat(std::string_view name) {
  for (const BitsTraits &traits : kBitsTraits)
    for (int group : kGroupSizes)
      for (bool symmetric : {true, false})
        for (ScaleType scale : {ScaleType::F16, ScaleType::BF16}) {
          QuantFormat format{traits.bits, group, symmetric, scale};
          if (format.name() == name)
            return format;
        }
  return std::nullopt;
}

std::string validateQuantFormat(const QuantFormat &format) {
  if (!bitsTraits(format.bits))
    return "bits must be 2, 3, 4 or 8, got " + std::to_string(format.bits);
  if (std::find(std::begin(kGroupSizes), std::end(kGroupSizes), format.group) == std::end(kGroupSizes))
    return "group must be 32, 64 or 128, got " + std::to_string(format.group);
  return "";
}

float scaleToFloat(uint16_t bits, ScaleType type) {
  if (type == ScaleType::BF16) {
    uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &wide, 4);
    return value;
  }
  return halfBitsToFloat(bits);
}

uint16_t floatToScale(float value, ScaleType type) {
  if (type == ScaleType::BF16) {
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    if ((bits & 0x7fffffff) > 0x7f800000)
      return static_cast<uint16_t>((bits >> 16) | 0x40);
    bits += 0x7fff + ((bits >> 16) & 1);
    return static_cast<uint16_t>(bits >> 16);
  }
  return floatToHalfBits(value);
}

namespace {

/// Where bit-plane `plane` of code `index` lives: a byte and a shift, and
/// how many bits that plane holds (see the layout in QuantFormat.h).
struct CodePlace {
  int64_t byte;
  int shift;
  int width;
};

CodePlace placeOf(int bits, int64_t index, int plane) {
  const int64_t block = index / kCodeBlock, j = index % kCodeBlock;
  const int64_t base = block * kCodeBlock * bits / 8;
  switch (bits) {
  case 8:
    return {index, 0, 8};
  case 4:
    return {base + j % 16, static_cast<int>(4 * (j / 16)), 4};
  case 2:
    return {base + j % 8, static_cast<int>(2 * (j / 8)), 2};
  default: // 3: two low bits as 2-bit codes, then the high bit plane
    return plane == 0 ? CodePlace{base + j % 8, static_cast<int>(2 * (j / 8)), 2}
                      : CodePlace{base + 8 + j / 8, static_cast<int>(j % 8), 1};
  }
}

} // namespace

int unpackCode(const uint8_t *codes, int bits, int64_t index) {
  CodePlace low = placeOf(bits, index, 0);
  int code = (codes[low.byte] >> low.shift) & ((1 << low.width) - 1);
  if (bits == 3) {
    CodePlace high = placeOf(bits, index, 1);
    code |= ((codes[high.byte] >> high.shift) & 1) << 2;
  }
  return code;
}

void packCode(uint8_t *codes, int bits, int64_t index, int code) {
  CodePlace low = placeOf(bits, index, 0);
  codes[low.byte] |= static_cast<uint8_t>((code & ((1 << low.width) - 1)) << low.shift);
  if (bits == 3) {
    CodePlace high = placeOf(bits, index, 1);
    codes[high.byte] |= static_cast<uint8_t>(((code >> 2) & 1) << high.shift);
  }
}

void quantizeGroupWith(const QuantFormat &format, const float *values, int64_t count, float scale, float min,
                       uint8_t *codes) {
  const float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
  const int zero = format.symmetric ? format.zeroPoint() : 0;
  for (int64_t i = 0; i < format.group; ++i) {
    int code;
    if (i >= count) {
      code = format.symmetric ? zero : (scale != 0.0f ? static_cast<int>(std::lround(-min * inverse)) : 0);
    } else if (format.symmetric) {
      code = static_cast<int>(std::lround(values[i] * inverse)) + zero;
    } else {
      code = static_cast<int>(std::lround((values[i] - min) * inverse));
    }
    packCode(codes, format.bits, i, std::clamp(code, 0, format.maxCode()));
  }
}

void quantizeReference(const QuantFormat &format, const float *matrix, int64_t rows, int64_t cols, uint8_t *out) {
  std::memset(out, 0, format.matrixBytes(rows, cols));
  const int64_t groups = format.groupsPerRow(cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float *values = matrix + r * cols + g * format.group;
      const int64_t count = std::min<int64_t>(format.group, cols - g * format.group);
      uint8_t *group = out + r * format.rowBytes(cols) + g * format.groupBytes();
      float scale, min = 0.0f;
      if (format.symmetric) {
        // GPTQ's symmetric grid: 2^bits levels around the zero point over [-absmax, absmax].
        float absMax = 0.0f;
        for (int64_t i = 0; i < count; ++i)
          absMax = std::max(absMax, std::fabs(values[i]));
        scale = 2.0f * absMax / static_cast<float>(format.maxCode());
      } else {
        float lo = values[0], hi = values[0];
        for (int64_t i = 1; i < count; ++i) {
          lo = std::min(lo, values[i]);
          hi = std::max(hi, values[i]);
        }
        // Zero is always representable (padding and exact zeros stay zero).
        lo = std::min(lo, 0.0f);
        hi = std::max(hi, 0.0f);
        scale = (hi - lo) / static_cast<float>(format.maxCode());
        min = lo;
      }
      // The stored 16-bit header must still cover the group: the min rounds
      // down, the scale (recomputed from it) rounds up, so no value falls
      // outside the grid by more than half a step.
      if (!format.symmetric) {
        const uint16_t minBits = roundedScale(min, format.scaleType, /*up=*/false);
        std::memcpy(group + 2, &minBits, 2);
        min = scaleToFloat(minBits, format.scaleType);
        float hi = 0.0f;
        for (int64_t i = 0; i < count; ++i)
          hi = std::max(hi, values[i]);
        scale = (hi - min) / static_cast<float>(format.maxCode());
      }
      const uint16_t scaleBits = roundedScale(scale, format.scaleType, /*up=*/true);
      std::memcpy(group, &scaleBits, 2);
      scale = scaleToFloat(scaleBits, format.scaleType);
      quantizeGroupWith(format, values, count, scale, min, group + format.headerBytes());
    }
}

void dequantizeReference(const QuantFormat &format, const uint8_t *data, int64_t rows, int64_t cols, float *out) {
  const int64_t groups = format.groupsPerRow(cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t *group = data + r * format.rowBytes(cols) + g * format.groupBytes();
      uint16_t scaleBits, minBits = 0;
      std::memcpy(&scaleBits, group, 2);
      const float scale = scaleToFloat(scaleBits, format.scaleType);
      float min;
      if (format.symmetric) {
        min = -static_cast<float>(format.zeroPoint()) * scale;
      } else {
        std::memcpy(&minBits, group + 2, 2);
        min = scaleToFloat(minBits, format.scaleType);
      }
      const uint8_t *codes = group + format.headerBytes();
      const int64_t count = std::min<int64_t>(format.group, cols - g * format.group);
      for (int64_t i = 0; i < count; ++i)
        out[r * cols + g * format.group + i] = static_cast<float>(unpackCode(codes, format.bits, i)) * scale + min;
    }
}

} // namespace moe::quant
