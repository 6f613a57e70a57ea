//===- Kernels.cpp - f32 building blocks of the forward pass --------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Kernels.h"

#include <cblas.h>

#include <algorithm>

namespace moe::kernels {

void linear(const float *x, int64_t tokens, const Matrix &weight, const std::vector<float> &bias,
            float *y) {
  const int64_t out = weight.rows, in = weight.cols;
  if (tokens == 1)
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(out), static_cast<int>(in), 1.0f,
                weight.data.data(), static_cast<int>(in), x, 1, 0.0f, y, 1);
  else
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(tokens),
                static_cast<int>(out), static_cast<int>(in), 1.0f, x, static_cast<int>(in),
                weight.data.data(), static_cast<int>(in), 0.0f, y, static_cast<int>(out));
  if (!bias.empty())
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t o = 0; o < out; ++o)
        y[t * out + o] += bias[o];
}

void rmsNorm(float *x, int64_t rows, int64_t width, const std::vector<float> &weight, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float *row = x + r * width;
    float sumSquares = 0.0f;
    for (int64_t i = 0; i < width; ++i)
      sumSquares += row[i] * row[i];
    float scale = 1.0f / std::sqrt(sumSquares / static_cast<float>(width) + static_cast<float>(eps));
    for (int64_t i = 0; i < width; ++i)
      row[i] = weight[i] * (row[i] * scale);
  }
}

void layerNorm(float *x, int64_t rows, int64_t width, const std::vector<float> &weight,
               const std::vector<float> &bias, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float *row = x + r * width;
    double mean = 0.0;
    for (int64_t i = 0; i < width; ++i)
      mean += row[i];
    mean /= static_cast<double>(width);
    double variance = 0.0;
    for (int64_t i = 0; i < width; ++i)
      variance += (row[i] - mean) * (row[i] - mean);
    variance /= static_cast<double>(width);
    float scale = static_cast<float>(1.0 / std::sqrt(variance + eps));
    for (int64_t i = 0; i < width; ++i)
      row[i] = (row[i] - static_cast<float>(mean)) * scale * weight[i] + (bias.empty() ? 0.0f : bias[i]);
  }
}

void softmax(float *x, int64_t count) {
  float maximum = *std::max_element(x, x + count);
  float sum = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    x[i] = std::exp(x[i] - maximum);
    sum += x[i];
  }
  for (int64_t i = 0; i < count; ++i)
    x[i] /= sum;
}

} // namespace moe::kernels
