//===- Router.cpp - Expert selection of every router kind -----------------===//
//
// Part of moec. Follows hf-moe-formats.md section 13 and the transformers
// implementations: softmax or sigmoid scores, plain or group-limited top-k,
// DeepSeek-V3's correction bias (used for choosing only), renormalisation,
// routed scaling, and PhiMoE's sparsemixer in evaluation mode. The forward
// arithmetic is kernels/common/Routing.h's, which the CUDA decode shares;
// here it runs with the CPU's softmax, and the backward lives beside it.
//
//===----------------------------------------------------------------------===//

#include "Router.h"
#include "Kernels.h"

#include "common/Routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace moe::router {
namespace {

/// Scratch of `rows` entries per array, reused per thread: NAEE's search
/// routes millions of times.
routing::Scratch scratchFor(int64_t rows) {
  thread_local std::vector<float> scores, choice, groupScores;
  thread_local std::vector<int32_t> taken;
  for (std::vector<float> *v : {&scores, &choice, &groupScores})
    v->resize(static_cast<size_t>(rows));
  taken.resize(static_cast<size_t>(rows));
  return {scores.data(), choice.data(), groupScores.data(), taken.data()};
}

} // namespace

void CpuMath::softmax(float *x, int32_t count) const { kernels::softmax(x, count); }
float CpuMath::sigmoid(float x) const { return kernels::sigmoid(x); }

routing::RouterParams params(const RouterSpec &router, int64_t numExperts) {
  routing::RouterParams p;
  p.rows = static_cast<int32_t>(numExperts);
  p.topK = static_cast<int32_t>(router.topK);
  p.scoring = static_cast<int32_t>(router.scoring);
  p.selection = static_cast<int32_t>(router.selection);
  p.groups = static_cast<int32_t>(router.numGroups);
  p.topKGroups = static_cast<int32_t>(router.topKGroups);
  p.normalize = router.normalizeTopK;
  p.scaling = static_cast<float>(router.scalingFactor);
  p.jitterBound = static_cast<float>(2.0 * router.jitterEps);
  return p;
}

void route(const RouterSpec &router, int64_t numExperts, const float *logits, const float *correctionBias,
           int32_t *chosen, float *weights) {
  routing::route(params(router, numExperts), logits, correctionBias, scratchFor(numExperts), chosen, weights,
                 CpuMath());
}

void skipWeakChoices(double threshold, int64_t K, float *weights) {
  routing::skipWeakChoices(threshold, static_cast<int32_t>(K), weights);
}

void routeBackward(const RouterSpec &router, int64_t numExperts, const float *logits, const int32_t *chosen,
                   const float *weightGradients, float *logitGradients) {
  std::fill(logitGradients, logitGradients + numExperts, 0.0f);
  const routing::RouterParams p = params(router, numExperts);
  const routing::Scratch s = scratchFor(numExperts);
  if (router.scoring == RouterScoring::SparseMixer) {
    // Each pick's weight is softmax(gates)[pick] over the window the
    // forward used: dw/dlogit_j = w (delta_j,pick - p_j); the picks and
    // windows are piecewise constant in the logits.
    float *masked = s.scores, *gates = s.choice;
    std::copy_n(logits, numExperts, masked);
    for (int pick = 0; pick < 2; ++pick) {
      const int32_t best = routing::sparseMixerPick(p, logits, masked, gates, CpuMath());
      const float w = gates[best], g = weightGradients[pick];
      for (int64_t j = 0; j < numExperts; ++j)
        logitGradients[j] += g * w * ((j == best ? 1.0f : 0.0f) - gates[j]);
      masked[best] = -std::numeric_limits<float>::infinity();
    }
    return;
  }
  const int64_t k = router.topK;
  float *scores = s.scores, *scoreGradients = s.choice;
  routing::computeScores(p, logits, scores, CpuMath());
  // weights_i = scale * s_ci (/ (sum_k s_ck + 1e-20) when renormalised).
  const float scale = static_cast<float>(router.scalingFactor);
  std::fill(scoreGradients, scoreGradients + numExperts, 0.0f);
  float sum = 0.0f, weighted = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    sum += scores[chosen[i]];
    weighted += scores[chosen[i]] * weightGradients[i];
  }
  sum += 1e-20f;
  for (int64_t i = 0; i < k; ++i)
    scoreGradients[chosen[i]] +=
        router.normalizeTopK ? scale * (weightGradients[i] / sum - weighted / (sum * sum)) : scale * weightGradients[i];
  if (router.scoring == RouterScoring::Softmax) {
    float dot = 0.0f;
    for (int64_t e = 0; e < numExperts; ++e)
      dot += scores[e] * scoreGradients[e];
    for (int64_t e = 0; e < numExperts; ++e)
      logitGradients[e] = scores[e] * (scoreGradients[e] - dot);
  } else {
    for (int64_t e = 0; e < numExperts; ++e)
      logitGradients[e] = scoreGradients[e] * scores[e] * (1.0f - scores[e]);
  }
}

void skipWeakChoicesBackward(double threshold, int64_t K, const float *weights, const float *skippedGradients,
                             float *weightGradients) {
  std::copy_n(skippedGradients, K, weightGradients);
  if (!(threshold > 0) || K < 2)
    return;
  // skipped_i = m_i w_i S / S' with S = sum w, S' = sum m w (m: kept).
  const int64_t first = std::max_element(weights, weights + K) - weights;
  float before = 0, after = 0, keptDot = 0;
  std::vector<bool> kept(static_cast<size_t>(K));
  for (int64_t i = 0; i < K; ++i) {
    kept[i] = !(i != first && weights[i] < threshold * weights[first]);
    before += weights[i];
    if (kept[i]) {
      after += weights[i];
      keptDot += weights[i] * skippedGradients[i];
    }
  }
  if (!(after > 0))
    return;
  for (int64_t i = 0; i < K; ++i)
    weightGradients[i] = (kept[i] ? skippedGradients[i] * before / after : 0.0f) + keptDot / after -
                         (kept[i] ? keptDot * before / (after * after) : 0.0f);
}

} // namespace moe::router
