//===- GgmlKernels.cpp - CPU GEMV over llama.cpp's block formats ----------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "cpu/GgmlKernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace moe::quant {

namespace {

float dotScalar(const float *a, const float *b, int n) {
  float sum = 0.0f;
  for (int i = 0; i < n; ++i)
    sum += a[i] * b[i];
  return sum;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) float dotAvx2(const float *a, const float *b, int n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int i = 0;
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

using Dot = float (*)(const float *, const float *, int);

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

const char *ggmlKernelIsa() { return kDot == dotScalar ? "scalar" : "avx2"; }

} // namespace moe::quant
