//===- Kernels.h - f32 building blocks of the forward pass ------*- C++ -*-===//
//
// Part of moec. Internal to the runtime.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_LIB_KERNELS_H
#define MOE_RUNTIME_LIB_KERNELS_H

#include "moe/Runtime/Weights.h"

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

namespace moe::kernels {

/// y[T, out] = x[T, in] . W[out, in]^T (+ bias[out] when not empty).
void linear(const float *x, int64_t tokens, const Matrix &weight, const std::vector<float> &bias, float *y);
inline void linear(const float *x, int64_t tokens, const Matrix &weight, float *y) {
  static const std::vector<float> none;
  linear(x, tokens, weight, none, y);
}

/// Decode (one token): a vector prepared once for every matrix it meets,
/// f32 and, for group-format matrices, quantized to int8 at each group
/// size they use (prepare before a parallel region; reads are then free).
class DecodeInput {
public:
  /// Points at x[cols] (kept by the caller) and forgets earlier quantizations.
  void reset(const float *x, int64_t cols);
  /// Makes ready what `weight`'s kernel reads.
  void prepareFor(const Matrix &weight);
  const float *values() const { return x; }
  /// The int8 activation at `group` (prepared).
  const quant::QuantizedActivation &quantized(int group) const { return byGroup[slot(group)]; }

private:
  static int slot(int group) { return group == 32 ? 0 : group == 64 ? 1 : 2; }
  const float *x = nullptr;
  int64_t cols = 0;
  quant::QuantizedActivation byGroup[3];
  bool ready[3] = {false, false, false};
};

/// y[r - begin] = row r . x for r in [begin, end), for any stored matrix (f32,
/// bf16, group formats, ggml blocks); `input` prepared for weight.
void gemvRange(const Matrix &weight, const DecodeInput &input, int64_t begin, int64_t end, float *y);
/// body(begin, end) over [0, rows), one range per thread of the persistent
/// pool (inline when `work`, elements or bytes touched, is too small to
/// pay for waking the workers). Ranges split output rows, never a sum.
void parallelRows(int64_t rows, int64_t work, const std::function<void(int64_t, int64_t)> &body);
/// task(i) for i in [0, count), each on one thread of the pool, taken in
/// order by whichever thread is free (put the longest first); a task's own
/// products (parallelRows inside it) run inline on its thread. Inline
/// when `work` is small, as parallelRows.
void parallelTasks(int64_t count, int64_t work, const std::function<void(int64_t)> &task);
/// Frees a kept (thread_local) work buffer above 64 MiB: reuse saves the
/// page faults of small ones, but a long prompt's must not stay resident.
template <typename T> void releaseIfLarge(std::vector<T> &buffer) {
  if (buffer.capacity() * sizeof(T) > (size_t(64) << 20))
    std::vector<T>().swap(buffer);
}
/// The pool's thread count (starting the pool, which puts OpenBLAS on one
/// thread: moe/Runtime/Blas.h).
unsigned poolThreads();
/// The same for bodies that call BLAS: OpenBLAS on one thread until all
/// ranges are done, so each call stays on the thread that made it
/// (moe/Runtime/Blas.h).
void parallelBlasRows(int64_t rows, int64_t work, const std::function<void(int64_t, int64_t)> &body);

/// y[t, o] += bias[o] for `tokens` rows of bias.size() values (none when empty).
void addBias(float *y, int64_t tokens, const std::vector<float> &bias);

/// RMSNorm of `rows` vectors of `width` in place: x * rsqrt(mean(x^2) + eps) * weight.
void rmsNorm(float *x, int64_t rows, int64_t width, const std::vector<float> &weight, double eps);
/// LayerNorm of `rows` vectors in place: (x - mean) / sqrt(var + eps) * weight + bias.
void layerNorm(float *x, int64_t rows, int64_t width, const std::vector<float> &weight, const std::vector<float> &bias,
               double eps);

/// In-place softmax of `count` values (max-subtracted, f32 like torch):
/// 16 lanes at a time with a polynomial e^x where AVX-512 is present
/// (within 2 ulps of softmaxScalar's), else softmaxScalar.
void softmax(float *x, int64_t count);
/// The same with the C library's expf, one value at a time.
void softmaxScalar(float *x, int64_t count);

/// Up to four queries at once, the keys read once for all of them:
/// scores[i * scoreStride + s] = scale * (q_i . key s) for s in
/// [0, visible), q_i = q + i * qStride, the keys given transposed
/// (`keysT[d * stride + s]`, d < dim). Sixteen keys per vector on AVX-512,
/// else scalar; each score is the same sum whatever the count.
void scoresOfTransposedKeys(const float *q, int64_t qStride, int count, const float *keysT, int64_t stride, int64_t dim,
                            int64_t visible, float scale, float *scores, int64_t scoreStride);
/// Up to four queries at once, the values read once for all of them:
/// out_i[dim] = sum over s < visible[i] of weights_i[s] * values[s * stride
/// ..], positions added in order, with weights_i = weights + i *
/// weightStride and out_i = out + i * outStride (visible ascending).
void weightedRows(const float *weights, int64_t weightStride, const int64_t *visible, int count, const float *values,
                  int64_t stride, int64_t dim, float *out, int64_t outStride);

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

} // namespace moe::kernels

#endif // MOE_RUNTIME_LIB_KERNELS_H
