//===- GgmlKernels.h - CPU GEMV over llama.cpp's block formats ---*- C++ -*-===//
//
// Part of moec. Decode-time matrix-vector products over rows of ggml blocks
// (kernels/common/GgmlFormats.h) read in place: each block is decoded into
// registers-sized buffers with the reference's arithmetic and dotted with
// the activation (AVX2/FMA chosen at run time, else scalar; Q4_0, Q4_1 and
// Q8_0 dotted straight from their codes), so a model in
// these formats runs at their size. Activations stay f32.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CPU_GGMLKERNELS_H
#define MOE_KERNELS_CPU_GGMLKERNELS_H

#include "common/GgmlFormats.h"

#include <cstdint>

namespace moe::quant {

/// y[r - begin] = row r . x, r in [begin, end), for a matrix of rows of
/// `cols` values in `type` (cols a whole number of blocks).
void ggmlGemvRows(GgmlType type, const uint8_t *data, int64_t cols, const float *x, int64_t begin, int64_t end,
                  float *y);
/// Rows [begin, end) as f32 ([end - begin, cols]).
void ggmlDequantizeRows(GgmlType type, const uint8_t *data, int64_t cols, int64_t begin, int64_t end, float *out);
/// a . b over n f32 values (AVX2/FMA when the machine has it); also the
/// runtime's decode kernel for f32 rows.
float dotF32(const float *a, const float *b, int64_t n);
/// "avx2" or "scalar": what ggmlGemvRows's dot products run on.
const char *ggmlKernelIsa();

} // namespace moe::quant

#endif // MOE_KERNELS_CPU_GGMLKERNELS_H
