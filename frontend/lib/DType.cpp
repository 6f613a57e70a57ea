//===- DType.cpp - Element types and their conversion to f32 --------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/DType.h"

#include <array>
#include <bit>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MOE_HAVE_X86 1
#endif

namespace moe {
namespace {

constexpr std::array<DTypeTraits, 15> traitsTable = {{
    {DType::Bool, "BOOL", 1, false},
    {DType::U8, "U8", 1, false},
    {DType::I8, "I8", 1, false},
    {DType::I16, "I16", 2, false},
    {DType::U16, "U16", 2, false},
    {DType::I32, "I32", 4, false},
    {DType::U32, "U32", 4, false},
    {DType::I64, "I64", 8, false},
    {DType::U64, "U64", 8, false},
    {DType::F16, "F16", 2, true},
    {DType::BF16, "BF16", 2, true},
    {DType::F32, "F32", 4, true},
    {DType::F64, "F64", 8, true},
    {DType::F8E4M3, "F8_E4M3", 1, true},
    {DType::F8E5M2, "F8_E5M2", 1, true},
}};

float float8E4M3Compute(uint8_t bits) {
  float sign = (bits & 0x80) ? -1.0f : 1.0f;
  unsigned exponent = (bits >> 3) & 0xF;
  unsigned mantissa = bits & 0x7;
  if (exponent == 0xF && mantissa == 0x7)
    return std::nanf(""); // e4m3fn has no infinity; only S.1111.111 is NaN.
  if (exponent == 0)
    return sign * std::ldexp(static_cast<float>(mantissa), -9);
  return sign * std::ldexp(1.0f + mantissa / 8.0f, static_cast<int>(exponent) - 7);
}

struct Float8Tables {
  std::array<float, 256> e4m3;
  std::array<float, 256> e5m2;
  Float8Tables() {
    for (unsigned i = 0; i < 256; ++i) {
      e4m3[i] = float8E4M3Compute(static_cast<uint8_t>(i));
      // e5m2 is the upper byte of an IEEE half.
      e5m2[i] = halfToFloat(static_cast<uint16_t>(i << 8));
    }
  }
};

const Float8Tables &float8Tables() {
  static const Float8Tables tables;
  return tables;
}

template <typename T> T loadUnaligned(const uint8_t *bytes) {
  T value;
  std::memcpy(&value, bytes, sizeof(T));
  return value;
}

void convertHalfScalar(const uint8_t *source, size_t count, float *out) {
  for (size_t i = 0; i < count; ++i)
    out[i] = halfToFloat(loadUnaligned<uint16_t>(source + 2 * i));
}

#ifdef MOE_HAVE_X86
__attribute__((target("avx,f16c"))) void convertHalfF16C(const uint8_t *source, size_t count, float *out) {
  size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm_prefetch(reinterpret_cast<const char *>(source + 2 * i) + 4096, _MM_HINT_T0);
    __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i *>(source + 2 * i));
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(halves));
  }
  convertHalfScalar(source + 2 * i, count - i, out + i);
}
#endif

void convertHalf(const uint8_t *source, size_t count, float *out) {
#ifdef MOE_HAVE_X86
  static const bool hasF16C = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  if (hasF16C)
    return convertHalfF16C(source, count, out);
#endif
  convertHalfScalar(source, count, out);
}

void convertBfloat16Scalar(const uint8_t *source, size_t count, float *out) {
  for (size_t i = 0; i < count; ++i)
    out[i] = bfloat16ToFloat(loadUnaligned<uint16_t>(source + 2 * i));
}

#ifdef MOE_HAVE_X86
__attribute__((target("avx2"))) void convertBfloat16Avx2(const uint8_t *source, size_t count, float *out) {
  size_t i = 0;
  for (; i + 16 <= count; i += 16) {
    // Hardware prefetchers stop at the 4 KiB page boundaries of a file
    // mapping; prefetching a page ahead keeps the loads streaming.
    _mm_prefetch(reinterpret_cast<const char *>(source + 2 * i) + 4096, _MM_HINT_T0);
    __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(source + 2 * i));
    // Interleaving zeros below each bf16 gives its f32 bit pattern.
    __m256i low = _mm256_unpacklo_epi16(_mm256_setzero_si256(), halves);
    __m256i high = _mm256_unpackhi_epi16(_mm256_setzero_si256(), halves);
    // unpack works per 128-bit lane: reorder to elements 0-7, 8-15.
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + i), _mm256_permute2x128_si256(low, high, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + i + 8), _mm256_permute2x128_si256(low, high, 0x31));
  }
  convertBfloat16Scalar(source + 2 * i, count - i, out + i);
}
#endif

void convertBfloat16(const uint8_t *source, size_t count, float *out) {
#ifdef MOE_HAVE_X86
  static const bool hasAvx2 = __builtin_cpu_supports("avx2");
  if (hasAvx2)
    return convertBfloat16Avx2(source, count, out);
#endif
  convertBfloat16Scalar(source, count, out);
}

#ifdef MOE_HAVE_X86
// E4M3 (fn) to f32, eight at a time: the 7 magnitude bits shifted left by 7
// form an IEEE half whose value is the E4M3 value times 2^-8 (exponent
// bias 15 instead of 7), subnormals included; F16C converts it exactly,
// a multiply by 256 rebiases, the sign is OR-ed back, and 0x7F becomes NaN.
__attribute__((target("avx2,f16c"))) void convertFloat8E4M3Avx2(const uint8_t *source, size_t count, float *out) {
  const __m128i magnitudeMask = _mm_set1_epi16(0x7F);
  const __m256 rebias = _mm256_set1_ps(256.0f);
  const __m256 nan = _mm256_set1_ps(std::nanf(""));
  size_t i = 0;
  for (; i + 8 <= count; i += 8) {
    _mm_prefetch(reinterpret_cast<const char *>(source + i) + 4096, _MM_HINT_T0);
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i *>(source + i));
    __m128i words = _mm_cvtepu8_epi16(bytes);
    __m128i magnitude = _mm_and_si128(words, magnitudeMask);
    __m256 value = _mm256_mul_ps(_mm256_cvtph_ps(_mm_slli_epi16(magnitude, 7)), rebias);
    __m256i sign =
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_srli_epi16(_mm_and_si128(words, _mm_set1_epi16(0x80)), 7)), 31);
    value = _mm256_or_ps(value, _mm256_castsi256_ps(sign));
    __m256i isNan = _mm256_cvtepi16_epi32(_mm_cmpeq_epi16(magnitude, magnitudeMask));
    value = _mm256_blendv_ps(value, nan, _mm256_castsi256_ps(isNan));
    _mm256_storeu_ps(out + i, value);
  }
  for (; i < count; ++i)
    out[i] = float8Tables().e4m3[source[i]];
}
#endif

void convertFloat8E4M3(const uint8_t *source, size_t count, float *out) {
#ifdef MOE_HAVE_X86
  static const bool hasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (hasAvx2)
    return convertFloat8E4M3Avx2(source, count, out);
#endif
  for (size_t i = 0; i < count; ++i)
    out[i] = float8Tables().e4m3[source[i]];
}

void convertByTable(const std::array<float, 256> &table, const uint8_t *source, size_t count, float *out) {
  for (size_t i = 0; i < count; ++i)
    out[i] = table[source[i]];
}

} // namespace

const DTypeTraits &dtypeTraits(DType dtype) { return traitsTable[static_cast<size_t>(dtype)]; }

std::optional<DType> parseDType(std::string_view name) {
  for (const DTypeTraits &traits : traitsTable)
    if (traits.name == name)
      return traits.dtype;
  return std::nullopt;
}

std::string supportedDTypeList() {
  std::string list;
  for (const DTypeTraits &traits : traitsTable) {
    if (!list.empty())
      list += ", ";
    list += traits.name;
  }
  return list;
}

std::optional<DType> parseTorchDType(std::string_view name) {
  if (name.substr(0, 6) == "torch.")
    name.remove_prefix(6);
  if (name == "bfloat16")
    return DType::BF16;
  if (name == "float16" || name == "half")
    return DType::F16;
  if (name == "float32" || name == "float")
    return DType::F32;
  if (name == "float8_e4m3fn")
    return DType::F8E4M3;
  return std::nullopt;
}

float halfToFloat(uint16_t bits) {
  uint32_t sign = static_cast<uint32_t>(bits & 0x8000) << 16;
  uint32_t magnitude = bits & 0x7FFF;
  // Shift exponent and mantissa into place, then rebias by 2^112; that
  // handles normals and subnormals alike. Inf/NaN keep an all-ones exponent.
  float scaled = std::bit_cast<float>(magnitude << 13) * 0x1p112f;
  uint32_t result = std::bit_cast<uint32_t>(scaled);
  if (magnitude >= 0x7C00)
    result |= 0x7F800000;
  return std::bit_cast<float>(result | sign);
}

float bfloat16ToFloat(uint16_t bits) { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }

float float8E4M3ToFloat(uint8_t bits) { return float8Tables().e4m3[bits]; }
float float8E5M2ToFloat(uint8_t bits) { return float8Tables().e5m2[bits]; }

uint16_t floatToBfloat16(float value) {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7FFFFFFF) > 0x7F800000)
    return static_cast<uint16_t>((bits >> 16) | 0x40); // quiet NaN
  uint32_t roundingBias = 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>((bits + roundingBias) >> 16);
}

uint16_t floatToHalf(float value) {
  uint32_t bits = std::bit_cast<uint32_t>(value);
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  uint32_t magnitude = bits & 0x7FFFFFFF;
  if (magnitude > 0x7F800000)
    return sign | 0x7E00; // NaN
  if (magnitude >= 0x47800000)
    return sign | 0x7C00; // overflow to infinity (65520 and above)
  if (magnitude < 0x38800000) {
    // Subnormal half: add 0.5 so the float adder rounds to nearest even at
    // the half's last subnormal bit.
    float shifted = std::bit_cast<float>(magnitude) + 0.5f;
    return sign | static_cast<uint16_t>(std::bit_cast<uint32_t>(shifted) - std::bit_cast<uint32_t>(0.5f));
  }
  uint32_t roundingBias = 0xFFF + ((magnitude >> 13) & 1);
  magnitude += roundingBias - (112u << 23);
  return sign | static_cast<uint16_t>(magnitude >> 13);
}

Status convertToF32(DType dtype, const void *source, size_t count, float *destination) {
  const auto *bytes = static_cast<const uint8_t *>(source);
  switch (dtype) {
  case DType::F32:
    std::memcpy(destination, bytes, count * sizeof(float));
    return Status::success();
  case DType::BF16:
    convertBfloat16(bytes, count, destination);
    return Status::success();
  case DType::F16:
    convertHalf(bytes, count, destination);
    return Status::success();
  case DType::F64:
    for (size_t i = 0; i < count; ++i)
      destination[i] = static_cast<float>(loadUnaligned<double>(bytes + 8 * i));
    return Status::success();
  case DType::F8E4M3:
    convertFloat8E4M3(bytes, count, destination);
    return Status::success();
  case DType::F8E5M2:
    convertByTable(float8Tables().e5m2, bytes, count, destination);
    return Status::success();
  default:
    return Status::error("cannot convert dtype ", dtypeName(dtype), " to f32: not a floating-point type");
  }
}

} // namespace moe
