//===- QuantKernels.cpp - CPU kernels over group-wise integer weights -----===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "cpu/QuantKernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace moe::quant {

namespace {

constexpr int kBlock = 32;

/// Unpacks the 32 codes of planar block `block` of a group.
void unpack32(const uint8_t *codes, int bits, int64_t block, uint8_t *out) {
  const uint8_t *bytes = codes + block * kBlock * bits / 8;
  switch (bits) {
  case 8:
    std::memcpy(out, bytes, 32);
    return;
  case 4:
    for (int j = 0; j < 16; ++j) {
      out[j] = bytes[j] & 0x0f;
      out[j + 16] = bytes[j] >> 4;
    }
    return;
  case 2:
    for (int j = 0; j < 32; ++j)
      out[j] = (bytes[j % 8] >> (2 * (j / 8))) & 3;
    return;
  default: // 3
    for (int j = 0; j < 32; ++j)
      out[j] = static_cast<uint8_t>(((bytes[j % 8] >> (2 * (j / 8))) & 3) | (((bytes[8 + j / 8] >> (j % 8)) & 1) << 2));
  }
}

void groupHeader(const QuantFormat &format, const uint8_t *group, float &scale, float &min) {
  uint16_t bits;
  std::memcpy(&bits, group, 2);
  scale = scaleToFloat(bits, format.scaleType);
  if (format.symmetric) {
    min = -static_cast<float>(format.zeroPoint()) * scale;
  } else {
    std::memcpy(&bits, group + 2, 2);
    min = scaleToFloat(bits, format.scaleType);
  }
}

#if defined(__x86_64__)
/// The 32 codes of planar block `block` as bytes, in code order.
__attribute__((target("avx2,fma,f16c"))) inline __m256i load32Codes(const uint8_t *codes, int bits, int64_t block) {
  const uint8_t *bytes = codes + block * kBlock * bits / 8;
  if (bits == 8)
    return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(bytes));
  if (bits == 4) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i *>(bytes));
    const __m128i mask = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
  }
  // Eight bytes of 2-bit planes, replicated per 64-bit lane and shifted by
  // 0, 2, 4, 6: lane q holds codes 8q .. 8q + 7.
  uint64_t planes;
  std::memcpy(&planes, bytes, 8);
  const __m256i low = _mm256_and_si256(
      _mm256_srlv_epi64(_mm256_set1_epi64x(static_cast<int64_t>(planes)), _mm256_setr_epi64x(0, 2, 4, 6)),
      _mm256_set1_epi8(3));
  if (bits == 2)
    return low;
  // 3 bits: byte j takes bit j % 8 of high-plane byte j / 8.
  uint32_t high;
  std::memcpy(&high, bytes + 8, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int32_t>(high)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(4)));
}

/// The decode GEMV over one row range; DOT(acc, u8 codes, s8 activation)
/// adds the four-byte dot products of each 32-bit lane to acc.
#define MOEC_GEMV_ROWS_BODY(DOT)                                                                                       \
  const QuantFormat &format = w.format;                                                                                \
  const int64_t groups = format.groupsPerRow(w.cols);                                                                  \
  const int blocksPerGroup = format.group / kBlock;                                                                    \
  const size_t rowBytes = format.rowBytes(w.cols), groupBytes = format.groupBytes();                                   \
  for (int64_t r = rowBegin; r < rowEnd; ++r) {                                                                        \
    const uint8_t *row = w.data + static_cast<size_t>(r) * rowBytes;                                                   \
    __m256 acc = _mm256_setzero_ps();                                                                                  \
    float minTerm = 0.0f;                                                                                              \
    for (int64_t g = 0; g < groups; ++g) {                                                                             \
      const uint8_t *group = row + static_cast<size_t>(g) * groupBytes;                                                \
      if (g + 1 < groups)                                                                                              \
        _mm_prefetch(reinterpret_cast<const char *>(group + groupBytes + 64), _MM_HINT_T0);                            \
      /* Header conversions inline (F16C for fp16; bf16 is a shift). */                                                \
      uint16_t scaleBits, minBits = 0;                                                                                 \
      std::memcpy(&scaleBits, group, 2);                                                                               \
      if (!format.symmetric)                                                                                           \
        std::memcpy(&minBits, group + 2, 2);                                                                           \
      float scale, min;                                                                                                \
      if (format.scaleType == ScaleType::F16) {                                                                        \
        scale = _cvtsh_ss(scaleBits);                                                                                  \
        min = format.symmetric ? -static_cast<float>(format.zeroPoint()) * scale : _cvtsh_ss(minBits);                 \
      } else {                                                                                                         \
        uint32_t wide = static_cast<uint32_t>(scaleBits) << 16;                                                        \
        std::memcpy(&scale, &wide, 4);                                                                                 \
        wide = static_cast<uint32_t>(minBits) << 16;                                                                   \
        std::memcpy(&min, &wide, 4);                                                                                   \
        if (format.symmetric)                                                                                          \
          min = -static_cast<float>(format.zeroPoint()) * scale;                                                       \
      }                                                                                                                \
      const uint8_t *codes = group + format.headerBytes();                                                             \
      __m256i groupSums = _mm256_setzero_si256();                                                                      \
      for (int b = 0; b < blocksPerGroup; ++b) {                                                                       \
        const __m256i q = load32Codes(codes, format.bits, b);                                                          \
        const __m256i a =                                                                                              \
            _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x.values.data() + g * format.group + b * kBlock));    \
        if (format.bits == 8) {                                                                                        \
          /* Codes up to 255 would overflow the unsigned x signed byte      */                                         \
          /* products' pairs: use q - 128 (|q - 128| <= 128) with the sign  */                                         \
          /* trick, and add 128 * sum(a) back through the min term below.   */                                         \
          const __m256i centred = _mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80)));                      \
          groupSums = DOT(groupSums, _mm256_sign_epi8(centred, centred), _mm256_sign_epi8(a, centred));                \
        } else {                                                                                                       \
          groupSums = DOT(groupSums, q, a);                                                                            \
        }                                                                                                              \
      }                                                                                                                \
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(groupSums), _mm256_set1_ps(scale * x.blockScales[g]), acc);             \
      minTerm += (format.bits == 8 ? min + 128.0f * scale : min) * x.groupSums[g];                                     \
    }                                                                                                                  \
    __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));                              \
    sum4 = _mm_hadd_ps(sum4, sum4);                                                                                    \
    sum4 = _mm_hadd_ps(sum4, sum4);                                                                                    \
    y[r - rowBegin] = _mm_cvtss_f32(sum4) + minTerm;                                                                   \
  }

/// AVX2: unsigned x signed byte products summed in pairs (int16; codes below
/// 16, or |q - 128| <= 128 against |a| <= 127, cannot overflow), then in
/// fours (int32).
__attribute__((target("avx2"))) inline __m256i dotAvx2(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

__attribute__((target("avx2,fma,f16c"))) void gemvRowsAvx2(const QuantMatrixView &w, const QuantizedActivation &x,
                                                           int64_t rowBegin, int64_t rowEnd, float *y) {
  MOEC_GEMV_ROWS_BODY(dotAvx2)
}

/// AVX-VNNI: one vpdpbusd per 32 bytes, accumulating straight into int32.
__attribute__((target("avx2,fma,f16c,avxvnni"))) inline __m256i dotVnni(__m256i acc, __m256i u, __m256i s) {
  return _mm256_dpbusd_avx_epi32(acc, u, s);
}

__attribute__((target("avx2,fma,f16c,avxvnni"))) void
gemvRowsVnni(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin, int64_t rowEnd, float *y) {
  MOEC_GEMV_ROWS_BODY(dotVnni)
}
#endif

bool useVnni() {
#if defined(__x86_64__)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avxvnni");
  return supported;
#else
  return false;
#endif
}

bool useAvx2() {
#if defined(__x86_64__)
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported;
#else
  return false;
#endif
}

} // namespace

void quantizeActivation(const float *x, int64_t cols, int group, QuantizedActivation &out) {
  // One scale per weight group (as llama.cpp's Q8_K uses one per 256), so
  // a group's integer products add up in int32 before one float multiply.
  const int64_t groups = (cols + group - 1) / group;
  out.cols = cols;
  out.group = group;
  out.values.assign(static_cast<size_t>(groups * group), 0);
  out.blockScales.assign(static_cast<size_t>(groups), 0.0f);
  out.groupSums.assign(static_cast<size_t>(groups), 0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * group, end = std::min<int64_t>(cols, begin + group);
    float absMax = 0.0f;
    for (int64_t i = begin; i < end; ++i)
      absMax = std::max(absMax, std::fabs(x[i]));
    const float scale = absMax / 127.0f, inverse = absMax > 0 ? 127.0f / absMax : 0.0f;
    out.blockScales[g] = scale;
    int32_t sum = 0;
    for (int64_t i = begin; i < end; ++i) {
      out.values[i] = static_cast<int8_t>(std::lround(x[i] * inverse));
      sum += out.values[i];
    }
    // The sum of the quantized activation, so that the kernel computes
    // exactly w^ . x^ and its error is that of x^ alone.
    out.groupSums[g] = static_cast<float>(sum) * scale;
  }
}

void gemvRowsScalar(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin, int64_t rowEnd,
                    float *y) {
  const QuantFormat &format = w.format;
  const int64_t groups = format.groupsPerRow(w.cols);
  const int blocksPerGroup = format.group / kBlock;
  uint8_t codes[32];
  for (int64_t r = rowBegin; r < rowEnd; ++r) {
    const uint8_t *row = w.data + static_cast<size_t>(r) * format.rowBytes(w.cols);
    float total = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t *group = row + static_cast<size_t>(g) * format.groupBytes();
      float scale, min;
      groupHeader(format, group, scale, min);
      int32_t sum = 0;
      for (int b = 0; b < blocksPerGroup; ++b) {
        unpack32(group + format.headerBytes(), format.bits, b, codes);
        const int8_t *values = x.values.data() + g * format.group + b * kBlock;
        for (int i = 0; i < kBlock; ++i)
          sum += static_cast<int32_t>(codes[i]) * values[i];
      }
      total += static_cast<float>(sum) * x.blockScales[g] * scale + min * x.groupSums[g];
    }
    y[r - rowBegin] = total;
  }
}

void gemvRows(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin, int64_t rowEnd, float *y) {
#if defined(__x86_64__)
  if (useVnni())
    return gemvRowsVnni(w, x, rowBegin, rowEnd, y);
  if (useAvx2())
    return gemvRowsAvx2(w, x, rowBegin, rowEnd, y);
#endif
  gemvRowsScalar(w, x, rowBegin, rowEnd, y);
}

void dequantizeRows(const QuantMatrixView &w, int64_t rowBegin, int64_t rowEnd, float *out) {
  // Block-wise unpacking (the reference goes code by code); same values.
  const QuantFormat &format = w.format;
  const int64_t groups = format.groupsPerRow(w.cols), cols = w.cols;
  const int blocksPerGroup = format.group / kBlock;
  uint8_t codes[kBlock];
  for (int64_t r = rowBegin; r < rowEnd; ++r) {
    const uint8_t *row = w.data + static_cast<size_t>(r) * format.rowBytes(cols);
    float *target = out + (r - rowBegin) * cols;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t *group = row + static_cast<size_t>(g) * format.groupBytes();
      float scale, min;
      groupHeader(format, group, scale, min);
      for (int b = 0; b < blocksPerGroup; ++b) {
        const int64_t first = g * format.group + b * kBlock;
        if (first >= cols)
          break;
        unpack32(group + format.headerBytes(), format.bits, b, codes);
        const int64_t count = std::min<int64_t>(kBlock, cols - first);
        for (int64_t i = 0; i < count; ++i)
          target[first + i] = static_cast<float>(codes[i]) * scale + min;
      }
    }
  }
}

const char *kernelIsa() { return useVnni() ? "avx-vnni" : useAvx2() ? "avx2" : "scalar"; }

void gemvRowsWithIsa(const char *isa, const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin,
                     int64_t rowEnd, float *y) {
#if defined(__x86_64__)
  if (std::strcmp(isa, "avx-vnni") == 0 && useVnni())
    return gemvRowsVnni(w, x, rowBegin, rowEnd, y);
  if (std::strcmp(isa, "avx2") == 0 && useAvx2())
    return gemvRowsAvx2(w, x, rowBegin, rowEnd, y);
#endif
  gemvRowsScalar(w, x, rowBegin, rowEnd, y);
}

std::vector<const char *> availableIsas() {
  std::vector<const char *> isas;
  if (useVnni())
    isas.push_back("avx-vnni");
  if (useAvx2())
    isas.push_back("avx2");
  isas.push_back("scalar");
  return isas;
}

} // namespace moe::quant
