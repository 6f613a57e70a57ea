//===- Rope.h - Rotary position embeddings ----------------------*- C++ -*-===//
//
// Part of moec. Internal to the runtime. Frequencies follow transformers'
// modeling_rope_utils (default, linear, dynamic, YaRN, LongRoPE).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_LIB_ROPE_H
#define MOE_RUNTIME_LIB_ROPE_H

#include "moe/Frontend/ModelSpec.h"

#include <vector>

namespace moe::rope {

/// cos/sin of every (token, frequency) of one forward call.
struct Angles {
  int64_t tokens = 0, half = 0;
  std::vector<float> cos, sin; ///< [tokens, half], already times the attention factor.
};

/// Angles for positions firstPosition .. firstPosition + tokens - 1 of a
/// model whose RoPE is `spec.rope` (rotary dimension spec.rope.rotaryDim).
Angles computeAngles(const ModelSpec &spec, int64_t firstPosition, int64_t tokens);

/// Rotates one head vector `x` (rotary part of width 2 * angles.half) of
/// token `token` in place.
void apply(float *x, RopeLayout layout, const Angles &angles, int64_t token);
/// The transpose of apply (its backward): x <- R^T x for the token's angles.
void applyTranspose(float *x, RopeLayout layout, const Angles &angles, int64_t token);

} // namespace moe::rope

#endif // MOE_RUNTIME_LIB_ROPE_H
