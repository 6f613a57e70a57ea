//===- QuantGemv.h - Quantized matrix x vector on the GPU -------*- C++ -*-===//
//
// Part of moec. y = W x for a matrix in any format of kernels/common
// (2/3/4/8 bits, groups of 32/64/128, sym/asym, f16/bf16 scales), read in
// place from the packed layout the CPU kernels and packages use: the decode
// step of a quantized expert on a GPU.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CUDA_QUANTGEMV_H
#define MOE_KERNELS_CUDA_QUANTGEMV_H

#include "common/QuantFormat.h"
#include "moe/Support/Status.h"

#include <cstdint>

namespace moe::cuda {

/// y[rows] = W[rows, cols] x[cols]; every pointer is device memory and `y`
/// is overwritten. Enqueued on the default stream (asynchronous).
Status gemvQuantizedDevice(const quant::QuantFormat &format, const uint8_t *weights, int64_t rows, int64_t cols,
                           const float *x, float *y);

/// The same from host memory (copies in, runs, copies out): for tests.
Status gemvQuantized(const quant::QuantFormat &format, const uint8_t *weights, int64_t rows, int64_t cols,
                     const float *x, float *y);

} // namespace moe::cuda

#endif // MOE_KERNELS_CUDA_QUANTGEMV_H
