//===- GgmlKernels.cpp - CPU GEMV over llama.cpp's block formats ----------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "cpu/GgmlKernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <cstring>

namespace moe::quant {

namespace {

float dotScalar(const float *a, const float *b, int64_t n) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i)
    sum += a[i] * b[i];
  return sum;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float dotAvx2(const float *a, const float *b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  __m256 acc = _mm256_add_ps(acc0, acc1);
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  sum = _mm_hadd_ps(sum, sum);
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(sum) + dotScalar(a + i, b + i, n - i);
}
#endif

#if defined(__x86_64__)
/// Q4_0, Q4_1 and Q8_0 rows dotted straight from their codes: per block the
/// codes widened to f32 in registers and multiplied into the activation,
/// the block's scale (and min times the activation's block sum) applied
/// once. Sums differ from decode-then-dot only in rounding.
__attribute__((target("avx2,fma,f16c"))) inline __m256 widen8(__m128i bytes, bool isSigned) {
  return _mm256_cvtepi32_ps(isSigned ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes));
}

__attribute__((target("avx2,fma,f16c"))) inline float horizontalSum(__m256 v) {
  __m128 sum = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  sum = _mm_hadd_ps(sum, sum);
  sum = _mm_hadd_ps(sum, sum);
  return _mm_cvtss_f32(sum);
}

__attribute__((target("avx2,fma,f16c"))) void gemvSmallBlocksAvx2(GgmlType type, const uint8_t *data, int64_t cols,
                                                                  const float *x, int64_t begin, int64_t end,
                                                                  float *y) {
  const int64_t blocks = cols / 32;
  const size_t blockBytes = static_cast<size_t>(ggmlTraits(type)->blockBytes);
  const size_t rowBytes = blockBytes * static_cast<size_t>(blocks);
  const __m128i lowMask = _mm_set1_epi8(0x0F);
  const __m256 eight = _mm256_set1_ps(8.0f);
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t *block = data + static_cast<size_t>(r) * rowBytes;
    __m256 total = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b, block += blockBytes) {
      const float *xb = x + b * 32;
      uint16_t dBits;
      std::memcpy(&dBits, block, 2);
      const __m256 d = _mm256_set1_ps(_cvtsh_ss(dBits));
      __m256 acc = _mm256_setzero_ps();
      if (type == GgmlType::Q8_0) {
        for (int k = 0; k < 4; ++k)
          acc = _mm256_fmadd_ps(widen8(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(block + 2 + 8 * k)), true),
                                _mm256_loadu_ps(xb + 8 * k), acc);
        total = _mm256_fmadd_ps(d, acc, total);
        continue;
      }
      const uint8_t *qs = block + (type == GgmlType::Q4_0 ? 2 : 4);
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i *>(qs));
      const __m128i low = _mm_and_si128(packed, lowMask), high = _mm_and_si128(_mm_srli_epi16(packed, 4), lowMask);
      __m256 codes[4] = {widen8(low, false), widen8(_mm_srli_si128(low, 8), false), widen8(high, false),
                         widen8(_mm_srli_si128(high, 8), false)};
      if (type == GgmlType::Q4_0)
        for (__m256 &c : codes)
          c = _mm256_sub_ps(c, eight);
      __m256 xs = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        const __m256 xk = _mm256_loadu_ps(xb + 8 * k);
        acc = _mm256_fmadd_ps(codes[k], xk, acc);
        xs = _mm256_add_ps(xs, xk);
      }
      total = _mm256_fmadd_ps(d, acc, total);
      if (type == GgmlType::Q4_1) {
        uint16_t mBits;
        std::memcpy(&mBits, block + 2, 2);
        total = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(mBits)), xs, total);
      }
    }
    y[r - begin] = horizontalSum(total);
  }
}
#endif

using Dot = float (*)(const float *, const float *, int64_t);

Dot chooseDot() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return dotAvx2;
#endif
  return dotScalar;
}

const Dot kDot = chooseDot();

} // namespace

void ggmlGemvRows(GgmlType type, const uint8_t *data, int64_t cols, const float *x, int64_t begin, int64_t end,
                  float *y) {
#if defined(__x86_64__)
  if (kDot != dotScalar && (type == GgmlType::Q4_0 || type == GgmlType::Q4_1 || type == GgmlType::Q8_0))
    return gemvSmallBlocksAvx2(type, data, cols, x, begin, end, y);
#endif
  const GgmlTraits *traits = ggmlTraits(type);
  const size_t rowBytes = ggmlRowBytes(type, cols);
  const int64_t blocks = cols / traits->blockSize;
  alignas(32) float values[kSuperBlock];
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t *row = data + static_cast<size_t>(r) * rowBytes;
    float sum = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
      ggmlDequantizeBlock(type, row + b * traits->blockBytes, values);
      sum += kDot(values, x + b * traits->blockSize, traits->blockSize);
    }
    y[r - begin] = sum;
  }
}

void ggmlDequantizeRows(GgmlType type, const uint8_t *data, int64_t cols, int64_t begin, int64_t end, float *out) {
  const size_t rowBytes = ggmlRowBytes(type, cols);
  for (int64_t r = begin; r < end; ++r)
    ggmlDequantizeRow(type, data + static_cast<size_t>(r) * rowBytes, cols, out + (r - begin) * cols);
}

float dotF32(const float *a, const float *b, int64_t n) { return kDot(a, b, n); }

const char *ggmlKernelIsa() { return kDot == dotScalar ? "scalar" : "avx2"; }

} // namespace moe::quant
