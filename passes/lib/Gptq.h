//===- Gptq.h - GPTQ quantization of one weight matrix ----------*- C++ -*-===//
//
// Part of moec. Internal to the passes. GPTQ (Frantar et al. 2023) as
// AutoGPTQ implements it: columns quantized one by one in blocks of
// `block`, the rounding error of each column spread over the columns not
// yet quantized through the upper Cholesky factor of the damped inverse
// Hessian H = X^T X of the matrix's inputs. Group scales are computed when
// a group's first column is reached (GptqGroupScales says on which weights)
// or, with act-order, up front on the original weights (GPTQ's static
// groups) so the groups stay contiguous in kernels/common's layout.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_GPTQ_H
#define MOE_PASSES_LIB_GPTQ_H

#include "common/GgmlFormats.h"
#include "common/QuantFormat.h"
#include "moe/Support/Status.h"
#include "moe/Transforms/PassOptions.h"

#include <memory>
#include <vector>

namespace moe {

struct GptqOptions {
  double damping = 0.01; ///< Fraction of mean(diag H) added to the diagonal.
  int64_t block = 128;   ///< Columns per lazy-update block.
  bool actOrder = false; ///< Quantize columns by decreasing diag(H).
  GptqGroupScales groupScales = GptqGroupScales::Static;
  /// The arithmetic of the factorisation and the updates: double (moec's
  /// default) or float (as AutoGPTQ and GPTQModel run it: twice the BLAS
  /// rate, 1.6x per DeepSeek-V3 expert; where float's factorisation fails,
  /// that Hessian's falls back to double, factoredInDoubleInstead).
  GptqPrecision precision = GptqPrecision::F64;
};

/// What GPTQ derives from a Hessian alone (the damped diagonal, the column
/// order, the Cholesky factor of the damped inverse): matrices that read
/// one input (an expert's gate and up) share it, and get the same codes as
/// each with its own copy of the Hessian.
struct GptqFactor;

/// The factor of `hessian` ([cols, cols]) under `options` (damping,
/// act-order). Fails when the damped Hessian is not positive definite.
Expected<std::shared_ptr<const GptqFactor>> factorGptqHessian(std::vector<double> hessian, int64_t cols,
                                                              const GptqOptions &options);

/// Whether `factor` was asked for in float but made in double: float's
/// Cholesky factorisation failed where double's succeeds (a Hessian that
/// is positive definite only to double's precision).
bool factoredInDoubleInstead(const GptqFactor &factor);

/// Quantizes row-major [rows, cols] `weights` with Hessian `hessian`
/// ([cols, cols], any positive scale) into `packed`
/// (format.matrixBytes(rows, cols)). Input dimensions that never saw a
/// signal (zero diagonal) get a unit diagonal, so their weights are rounded
/// as RTN would (AutoGPTQ zeroes them). Fails when the damped Hessian is
/// not positive definite.
Status quantizeGptq(const quant::QuantFormat &format, const std::vector<float> &weights, int64_t rows, int64_t cols,
                    std::vector<double> hessian, const GptqOptions &options, std::vector<uint8_t> &packed);
/// The same with the Hessian's factor (factorGptqHessian, same options).
Status quantizeGptq(const quant::QuantFormat &format, const std::vector<float> &weights, int64_t rows, int64_t cols,
                    const GptqFactor &factor, const GptqOptions &options, std::vector<uint8_t> &packed);

/// GPTQ whose grid is a ggml block format's own quantizer (`cols` a whole
/// number of blocks): each block's scales (a K-quant's quantized sub-block
/// scales) are chosen from the weights that GptqGroupScales names (when
/// its first column comes up, or all up front for static), weighted by the
/// damped Hessian's diagonal; each column is then rounded under them. `packed` gets the format's rows.
Status quantizeGptqGgml(quant::GgmlType type, const std::vector<float> &weights, int64_t rows, int64_t cols,
                        std::vector<double> hessian, const GptqOptions &options, std::vector<uint8_t> &packed);
Status quantizeGptqGgml(quant::GgmlType type, const std::vector<float> &weights, int64_t rows, int64_t cols,
                        const GptqFactor &factor, const GptqOptions &options, std::vector<uint8_t> &packed);

} // namespace moe

#endif // MOE_PASSES_LIB_GPTQ_H
