//===- StatisticNames.h - Names of calibration statistics -------*- C++ -*-===//
//
// Part of moec. The one list of statistic names: calibration writes them
// (`layers.<l>.<name>` and `layers.<l>.experts.<e>.<name>` in a
// safetensors file) and passes read them. E is the layer's expert slots, I
// an expert's width, H the hidden size.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_CALIBRATION_STATISTICNAMES_H
#define MOE_CALIBRATION_STATISTICNAMES_H

namespace moe::stats {

/// Per layer [E] (I64): tokens routed to each expert slot.
inline constexpr const char *kRoutedTokens = "routed_tokens";
/// Per layer [] (I64): tokens that passed the layer's router.
inline constexpr const char *kTokens = "tokens";
/// Per layer [E]: router probabilities summed over tokens.
inline constexpr const char *kRouterScoreSum = "router_score_sum";
/// Per layer [E]: routed weights summed over the tokens routed to each expert.
inline constexpr const char *kGateWeightSum = "gate_weight_sum";
/// Per layer [E]: EASY-EP's score, sum of g ||E(x)|| max(1 - cos(h, h + r), 0).
inline constexpr const char *kEasyEpScore = "easy_ep_score";
/// Per layer [E]: largest |down_proj output| over the tokens routed to
/// the expert (Super Experts; with --all-experts still routed tokens only).
inline constexpr const char *kMaxAbsOutput = "max_abs_output";
/// Per layer with a shared expert [1]: largest |down_proj output| of the
/// shared expert (it counts in the Super Experts percentile).
inline constexpr const char *kSharedMaxAbsOutput = "shared_max_abs_output";
/// Per layer [E, E]: Gram matrix of router logits (merging similarity).
inline constexpr const char *kRouterLogitGram = "router_logit_gram";
/// Per layer [E]: the top logit summed over the tokens where it was top (PreMoe).
inline constexpr const char *kTopLogitSum = "top_logit_sum";
/// Per expert [I]: sum of squared intermediate activations.
inline constexpr const char *kNeuronSquareSum = "neuron_square_sum";
/// Per expert [I]: max of squared intermediate activations.
inline constexpr const char *kNeuronSquareMax = "neuron_square_max";
/// Per expert [I]: the same, weighted by the routed weight (CAMERA, HEAPr).
inline constexpr const char *kNeuronWeightedSquareSum = "neuron_weighted_square_sum";
/// Per expert [I]: max of the weighted squares.
inline constexpr const char *kNeuronWeightedSquareMax = "neuron_weighted_square_max";
/// Per expert [I] (with --gradients): sum over routed tokens of the squared
/// gradient of the language-model loss with respect to the neuron's
/// activation (the down projection's input, routing weight included):
/// w_j^T (sum_t g_t g_t^T) w_j, HEAPr's output-space Fisher term.
inline constexpr const char *kNeuronGradientSquareSum = "neuron_gradient_square_sum";
/// Per expert [H, H]: X^T X of the routed inputs (GPTQ).
inline constexpr const char *kInputMoments = "input_moments";
/// Per expert [I, I]: X^T X of the down-projection inputs.
inline constexpr const char *kIntermediateMoments = "intermediate_moments";
/// Per layer [E] (I64): tokens in each expert's moments (after the sample cap).
inline constexpr const char *kMomentTokens = "moment_tokens";
/// Per layer [S, H] (F32): sampled MoE-block inputs.
inline constexpr const char *kBlockInput = "block_input";
/// Per layer [S, H] (F32): the block's outputs for them.
inline constexpr const char *kBlockOutput = "block_output";
/// Per layer [H, H]: X^T X of the attention input.
inline constexpr const char *kAttentionInputMoments = "attention_input_moments";
/// Per layer: X^T X of the attended values (o_proj input).
inline constexpr const char *kAttentionOutputMoments = "attention_output_moments";
/// Per layer [H, H]: X^T X of the shared experts' input.
inline constexpr const char *kSharedInputMoments = "shared_input_moments";
/// Per layer: X^T X of the shared experts' down input.
inline constexpr const char *kSharedIntermediateMoments = "shared_intermediate_moments";

} // namespace moe::stats

#endif // MOE_CALIBRATION_STATISTICNAMES_H
