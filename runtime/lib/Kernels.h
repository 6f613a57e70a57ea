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
#include <vector>

namespace moe::kernels {

/// y[T, out] = x[T, in] . W[out, in]^T (+ bias[out] when not empty).
void linear(const float *x, int64_t tokens, const Matrix &weight, const std::vector<float> &bias, float *y);
inline void linear(const float *x, int64_t tokens, const Matrix &weight, float *y) {
  static const std::vector<float> none;
  linear(x, tokens, weight, none, y);
}

/// RMSNorm of `rows` vectors of `width` in place: x * rsqrt(mean(x^2) + eps) * weight.
void rmsNorm(float *x, int64_t rows, int64_t width, const std::vector<float> &weight, double eps);
/// LayerNorm of `rows` vectors in place: (x - mean) / sqrt(var + eps) * weight + bias.
void layerNorm(float *x, int64_t rows, int64_t width, const std::vector<float> &weight, const std::vector<float> &bias,
               double eps);

/// In-place softmax of `count` values (max-subtracted, f32 like torch).
void softmax(float *x, int64_t count);

inline float silu(float x) { return x / (1.0f + std::exp(-x)); }
inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

} // namespace moe::kernels

#endif // MOE_RUNTIME_LIB_KERNELS_H
