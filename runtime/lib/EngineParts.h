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
#include "moe/Runtime/Engine.h"
#include "moe/Runtime/Weights.h"

#include <cstdint>
#include <set>
#include <vector>

namespace moe::detail {

/// The model's norm (RMSNorm or LayerNorm) of `tokens` rows of the hidden size, in place.
void normalize(const ModelSpec &spec, float *x, int64_t tokens, const std::vector<float> &weight,
               const std::vector<float> &bias);

/// The weight of the shared expert's output for one token: 1, or
/// sigmoid(x . gate) when it is gated (Qwen2-MoE).
float sharedExpertGate(const LayerSpec &layer, const LayerWeights &w, const float *x, int64_t H);

/// A MoE block's routing of `tokens` inputs: what the router chose and how
/// the engine groups it per expert slot.
struct BlockRouting {
  std::vector<float> logits;   ///< [T, E] router logits (masked rows -inf).
  std::vector<int32_t> chosen; ///< [T, K] router rows chosen.
  std::vector<float> weights;  ///< [T, K] their weights as route gave them.
  std::vector<float> skipped;  ///< [T, K] after dynamic skipping.
  /// [T, K] the slot each choice runs as; -1 where skipping dropped it.
  std::vector<int32_t> slotOfChoice;
  /// Per slot: its tokens in order, and each one's summed weight (a token
  /// whose choices share a merged slot runs it once).
  std::vector<std::vector<int32_t>> tokensOf;
  std::vector<std::vector<float>> weightsOf;
};

/// The router of a MoE layer on x[tokens, H]: logits (computed, or the
/// given `logits` [tokens, router rows]), `maskedRows` set to -inf, route
/// per token, skipping, grouping by slot. Buffers are reused.
void routeBlock(const ModelSpec &spec, const LayerWeights &w, const float *x, int64_t tokens,
                const std::set<int64_t> *maskedRows, BlockRouting &routing, const float *logits = nullptr);

/// out[tokens, H] = the routed experts' outputs, weighted and added in slot
/// order as the expert-by-expert loop adds them (zero, then out[token] +=
/// weight * output, slot after slot), from `outputs` holding every routed
/// row slot after slot (a slot's rows in its tokens' order). A device's
/// routedExperts adds in this order too (cuda::blockWeightedSum).
void addRoutedOutputs(const std::vector<std::vector<int32_t>> &tokensOf,
                      const std::vector<std::vector<float>> &weightsOf, const float *outputs, int64_t tokens, int64_t H,
                      float *out);

/// moeBlockForward with routed experts taken from `cache` when it is not
/// null (expert offloading; loading may fail).
Status moeBlock(const ModelSpec &spec, const LayerSpec &layer, const LayerWeights &w, const float *x, int64_t tokens,
                float *out, const MoeBlockHooks &hooks, ExpertCache *cache);

} // namespace moe::detail

#endif // MOE_RUNTIME_LIB_ENGINEPARTS_H
