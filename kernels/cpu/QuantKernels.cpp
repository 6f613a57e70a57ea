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

/// Unpacks 32 consecutive codes starting at code `first` of a group.
void unpack32(const uint8_t *codes, int bits, int64_t first, uint8_t *out) {
  switch (bits) {
  case 8:
    std::memcpy(out, codes + first, 32);
    return;
  case 4: {
    const uint8_t *bytes = codes + first / 2;
    for (int i = 0; i < 16; ++i) {
      out[2 * i] = bytes[i] & 0x0f;
      out[2 * i + 1] = bytes[i] >> 4;
    }
    return;
  }
  case 2: {
    const uint8_t *bytes = codes + first / 4;
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j)
        out[4 * i + j] = (bytes[i] >> (2 * j)) & 3;
    return;
  }
  case 3: {
    const uint8_t *bytes = codes + first * 3 / 8;
    for (int i = 0; i < 4; ++i) {
      const uint32_t window = bytes[3 * i] | (bytes[3 * i + 1] << 8) | (bytes[3 * i + 2] << 16);
      for (int j = 0; j < 8; ++j)
        out[8 * i + j] = (window >> (3 * j)) & 7;
    }
    return;
  }
  default:
    for (int i = 0; i < 32; ++i)
      out[i] = static_cast<uint8_t>(unpackCode(codes, bits, first + i));
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
__attribute__((target("avx2,fma,f16c"))) inline __m256i load32Codes(const uint8_t *codes, int bits, int64_t first) {
  if (bits == 4) {
    // 16 bytes hold 32 nibbles, low nibble first: split and interleave.
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i *>(codes + first / 2));
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m128i low = _mm_and_si128(packed, mask), high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    return _mm256_set_m128i(_mm_unpackhi_epi8(low, high), _mm_unpacklo_epi8(low, high));
  }
  alignas(32) uint8_t unpacked[32];
  unpack32(codes, bits, first, unpacked);
  return _mm256_load_si256(reinterpret_cast<const __m256i *>(unpacked));
}

__attribute__((target("avx2,fma,f16c"))) void gemvRowsAvx2(const QuantMatrixView &w, const QuantizedActivation &x,
                                                           int64_t rowBegin, int64_t rowEnd, float *y) {
  const QuantFormat &format = w.format;
  const int64_t groups = format.groupsPerRow(w.cols);
  const int blocksPerGroup = format.group / kBlock;
  const size_t rowBytes = format.rowBytes(w.cols), groupBytes = format.groupBytes();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t r = rowBegin; r < rowEnd; ++r) {
    const uint8_t *row = w.data + static_cast<size_t>(r) * rowBytes;
    __m256 acc = _mm256_setzero_ps();
    float minTerm = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t *group = row + static_cast<size_t>(g) * groupBytes;
      if (g + 1 < groups)
        _mm_prefetch(reinterpret_cast<const char *>(group + groupBytes + 64), _MM_HINT_T0);
      float scale, min;
      groupHeader(format, group, scale, min);
      const uint8_t *codes = group + format.headerBytes();
      __m256 groupAcc = _mm256_setzero_ps();
      for (int b = 0; b < blocksPerGroup; ++b) {
        const int64_t block = g * blocksPerGroup + b;
        const __m256i q = load32Codes(codes, format.bits, static_cast<int64_t>(b) * kBlock);
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x.values.data() + block * kBlock));
        __m256i sums;
        if (format.bits == 8) {
          // Codes up to 255 would saturate maddubs' int16 pairs: widen first.
          const __m256i q0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q));
          const __m256i q1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q, 1));
          const __m256i a0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(a));
          const __m256i a1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(a, 1));
          sums = _mm256_add_epi32(_mm256_madd_epi16(q0, a0), _mm256_madd_epi16(q1, a1));
        } else {
          // Codes < 16 times int8: pairs stay far inside int16.
          sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), ones);
        }
        groupAcc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(x.blockScales[block]), groupAcc);
      }
      acc = _mm256_fmadd_ps(groupAcc, _mm256_set1_ps(scale), acc);
      minTerm += min * x.groupSums[g];
    }
    __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    sum4 = _mm_hadd_ps(sum4, sum4);
    sum4 = _mm_hadd_ps(sum4, sum4);
    y[r - rowBegin] = _mm_cvtss_f32(sum4) + minTerm;
  }
}
#endif

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
  const int64_t groups = (cols + group - 1) / group;
  const int64_t padded = groups * group, blocks = padded / kBlock;
  out.cols = cols;
  out.group = group;
  out.values.assign(static_cast<size_t>(padded), 0);
  out.blockScales.assign(static_cast<size_t>(blocks), 0.0f);
  out.groupSums.assign(static_cast<size_t>(groups), 0.0f);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kBlock, end = std::min<int64_t>(cols, begin + kBlock);
    float absMax = 0.0f;
    for (int64_t i = begin; i < end; ++i)
      absMax = std::max(absMax, std::fabs(x[i]));
    const float scale = absMax / 127.0f, inverse = absMax > 0 ? 127.0f / absMax : 0.0f;
    out.blockScales[b] = scale;
    for (int64_t i = begin; i < end; ++i)
      out.values[i] = static_cast<int8_t>(std::lround(x[i] * inverse));
  }
  // Sums of the quantized activation, so that the kernel computes exactly
  // w^ . x^ and its error is that of x^ alone (sum |w^| * blockScale / 2).
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t sum = 0;
    for (int64_t i = b * kBlock; i < (b + 1) * kBlock; ++i)
      sum += out.values[i];
    out.groupSums[(b * kBlock) / group] += static_cast<float>(sum) * out.blockScales[b];
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
      float groupTotal = 0.0f;
      for (int b = 0; b < blocksPerGroup; ++b) {
        const int64_t block = g * blocksPerGroup + b;
        unpack32(group + format.headerBytes(), format.bits, static_cast<int64_t>(b) * kBlock, codes);
        int32_t sum = 0;
        for (int i = 0; i < kBlock; ++i)
          sum += static_cast<int32_t>(codes[i]) * x.values[block * kBlock + i];
        groupTotal += static_cast<float>(sum) * x.blockScales[block];
      }
      total += groupTotal * scale + min * x.groupSums[g];
    }
    y[r - rowBegin] = total;
  }
}

void gemvRows(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin, int64_t rowEnd, float *y) {
#if defined(__x86_64__)
  if (useAvx2())
    return gemvRowsAvx2(w, x, rowBegin, rowEnd, y);
#endif
  gemvRowsScalar(w, x, rowBegin, rowEnd, y);
}

void dequantizeRows(const QuantMatrixView &w, int64_t rowBegin, int64_t rowEnd, float *out) {
  const QuantFormat &format = w.format;
  const size_t rowBytes = format.rowBytes(w.cols);
  dequantizeReference(format, w.data + static_cast<size_t>(rowBegin) * rowBytes, rowEnd - rowBegin, w.cols, out);
}

const char *kernelIsa() { return useAvx2() ? "avx2" : "scalar"; }

} // namespace moe::quant
