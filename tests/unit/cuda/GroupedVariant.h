//===- GroupedVariant.h - qwen3_moe with other head counts ------*- C++ -*-===//
//
// Part of moec. Variants of tests/data/hf/qwen3_moe with more query heads
// per KV head, or heads of another size, made of the checkpoint's own
// values: the GPU tests' grouped-query shapes (CudaEngineTest) and, through
// tests/tools/write-grouped-variant, a package of them (HostWorkTest).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_TESTS_UNIT_CUDA_GROUPEDVARIANT_H
#define MOE_TESTS_UNIT_CUDA_GROUPEDVARIANT_H

#include "moe/Support/Status.h"

#include <filesystem>
#include <string>

namespace moe::testing {

/// tests/data/hf/qwen3_moe (4 query heads of 16 over 2 KV heads) with
/// `heads` query heads of `headDim` over `kvHeads` KV heads, written under
/// `dir` (`source`: that checkpoint's directory). A layer's q_proj, k_proj
/// and v_proj take their rows in turn from the layer's own matrices of 32
/// columns (q, k, v, the router, then the experts' gate and up: 260 rows),
/// o_proj's row r takes its columns from its rows r and (r + 1) % 32, and
/// q_norm and k_norm their values, repeated past 16. Every value is the
/// checkpoint's; the model is one transformers could have saved with these
/// shapes. An error for head counts it cannot make, or a source that is
/// not that checkpoint's layout.
Status writeGroupedVariant(const std::string &source, const std::filesystem::path &dir, int heads, int kvHeads,
                           int headDim);

} // namespace moe::testing

#endif // MOE_TESTS_UNIT_CUDA_GROUPEDVARIANT_H
