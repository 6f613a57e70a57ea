//===- EngineParts.h - Pieces of the forward pass the backward shares -*- C++ -*-===//
//
// Part of moec. Internal to the runtime: the engine's own functions that
// the activation backward (Gradients.cpp) recomputes a layer with, so that
// both run the same arithmetic.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_LIB_ENGINEPARTS_H
#define MOE_RUNTIME_LIB_ENGINEPARTS_H

#include "moe/Frontend/ModelSpec.h"
#include "moe/Runtime/Weights.h"

#include <cstdint>
#include <vector>

namespace moe::detail {

/// The model's norm (RMSNorm or LayerNorm) of `tokens` rows of the hidden size, in place.
void normalize(const ModelSpec &spec, float *x, int64_t tokens, const std::vector<float> &weight,
               const std::vector<float> &bias);

/// The weight of the shared expert's output for one token: 1, or
/// sigmoid(x . gate) when it is gated (Qwen2-MoE).
float sharedExpertGate(const LayerSpec &layer, const LayerWeights &w, const float *x, int64_t H);

} // namespace moe::detail

#endif // MOE_RUNTIME_LIB_ENGINEPARTS_H
