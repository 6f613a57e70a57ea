//===- Router.cpp - Expert selection of every router kind -----------------===//
//
// Part of moec. Follows hf-moe-formats.md section 13 and the transformers
// implementations: softmax or sigmoid scores, plain or group-limited top-k,
// DeepSeek-V3's correction bias (used for choosing only), renormalisation,
// routed scaling, and PhiMoE's sparsemixer in evaluation mode.
//
//===----------------------------------------------------------------------===//

#include "Router.h"
#include "Kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace moe::router {
namespace {

constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();

/// Indices of the k largest values, largest first (ties: lower index).
void topK(const std::vector<float> &values, int64_t k, int32_t *out) {
  thread_local std::vector<int32_t> orderBuffer;
  std::vector<int32_t> &order = orderBuffer;
  order.resize(values.size());
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int32_t a, int32_t b) { return values[a] != values[b] ? values[a] > values[b] : a < b; });
  std::copy(order.begin(), order.begin() + k, out);
}

/// PhiMoE sparsemixer, evaluation mode: two experts, each weighted by a
/// softmax over the logits that lie within 2 * jitter of its own logit
/// (relative), the first one excluded when choosing the second. With
/// `weightGradients`, adds the gradient of the weights' loss with respect
/// to the logits to `logitGradients` instead (the choices and the sets they
/// were weighted over are fixed: piecewise constant in the logits).
void sparseMixer(const RouterSpec &router, int64_t numExperts, const float *logits, int32_t *chosen, float *weights,
                 const float *weightGradients = nullptr, float *logitGradients = nullptr) {
  std::vector<float> masked(logits, logits + numExperts);
  const float threshold = static_cast<float>(2.0 * router.jitterEps);
  for (int pick = 0; pick < 2; ++pick) {
    // masked holds -inf at experts already picked.
    int32_t best = static_cast<int32_t>(std::max_element(masked.begin(), masked.end()) - masked.begin());
    float top = masked[best];
    std::vector<float> gates(masked);
    for (int64_t j = 0; j < numExperts; ++j) {
      float factor = std::max(std::fabs(logits[j]), top);
      if ((top - logits[j]) / factor > threshold)
        gates[j] = kMinusInfinity;
    }
    kernels::softmax(gates.data(), numExperts);
    if (weightGradients) {
      // w = softmax(gates)[best]: dw/dlogit_j = w (delta_j,best - p_j).
      const float w = gates[best], g = weightGradients[pick];
      for (int64_t j = 0; j < numExperts; ++j)
        logitGradients[j] += g * w * ((j == best ? 1.0f : 0.0f) - gates[j]);
    } else {
      chosen[pick] = best;
      weights[pick] = gates[best];
    }
    masked[best] = kMinusInfinity;
  }
}
/// Every row's score: softmax over the logits or sigmoid of each.
void computeScores(const RouterSpec &router, int64_t numExperts, const float *logits, std::vector<float> &scores) {
  scores.assign(logits, logits + numExperts);
  if (router.scoring == RouterScoring::Softmax)
    kernels::softmax(scores.data(), numExperts);
  else
    for (float &score : scores)
      score = kernels::sigmoid(score);
}

} // namespace

void route(const RouterSpec &router, int64_t numExperts, const float *logits, const float *correctionBias,
           int32_t *chosen, float *weights) {
  const int64_t k = router.topK;
  if (router.scoring == RouterScoring::SparseMixer)
    return sparseMixer(router, numExperts, logits, chosen, weights);

  // Reused per thread: NAEE's search routes millions of times.
  thread_local std::vector<float> scoresBuffer, choiceBuffer;
  std::vector<float> &scores = scoresBuffer, &choice = choiceBuffer;
  computeScores(router, numExperts, logits, scores);

  choice.assign(scores.begin(), scores.end());
  if (correctionBias)
    for (int64_t e = 0; e < numExperts; ++e)
      choice[e] += correctionBias[e];
  // A masked row (logit -inf: an expert switched off, as if absent) is
  // never chosen, whatever its correction bias: sigmoid(-inf) + bias would
  // otherwise let it take a top-k slot with weight 0.
  for (int64_t e = 0; e < numExperts; ++e)
    if (logits[e] == kMinusInfinity)
      choice[e] = kMinusInfinity;

  if (router.selection != ExpertSelection::TopK) {
    const int64_t groups = router.numGroups, perGroup = numExperts / groups;
    std::vector<float> groupScores(static_cast<size_t>(groups));
    for (int64_t g = 0; g < groups; ++g) {
      std::vector<float> members(choice.begin() + g * perGroup, choice.begin() + (g + 1) * perGroup);
      std::sort(members.begin(), members.end(), std::greater<float>());
      // A group scores by its present experts: a masked member adds nothing
      // to the top-two sum (a group with none left is never kept).
      groupScores[g] =
          router.selection == ExpertSelection::GroupLimitedMax || perGroup == 1 || members[1] == kMinusInfinity
              ? members[0]
              : members[0] + members[1];
    }
    std::vector<int32_t> keptGroups(static_cast<size_t>(router.topKGroups));
    topK(groupScores, router.topKGroups, keptGroups.data());
    std::vector<bool> kept(static_cast<size_t>(groups), false);
    for (int32_t g : keptGroups)
      kept[g] = true;
    for (int64_t e = 0; e < numExperts; ++e)
      if (!kept[e / perGroup])
        choice[e] = kMinusInfinity;
  }

  topK(choice, k, chosen);
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    weights[i] = scores[chosen[i]];
    sum += weights[i];
  }
  for (int64_t i = 0; i < k; ++i) {
    if (router.normalizeTopK)
      weights[i] /= sum + 1e-20f;
    weights[i] *= static_cast<float>(router.scalingFactor);
  }
}

void skipWeakChoices(double threshold, int64_t K, float *weights) {
  if (!(threshold > 0) || K < 2)
    return;
  const int64_t first = std::max_element(weights, weights + K) - weights;
  float before = 0, after = 0;
  for (int64_t i = 0; i < K; ++i) {
    before += weights[i];
    if (i != first && weights[i] < threshold * weights[first])
      weights[i] = 0;
    after += weights[i];
  }
  if (after > 0)
    for (int64_t i = 0; i < K; ++i)
      weights[i] *= before / after;
}

void routeBackward(const RouterSpec &router, int64_t numExperts, const float *logits, const int32_t *chosen,
                   const float *weightGradients, float *logitGradients) {
  std::fill(logitGradients, logitGradients + numExperts, 0.0f);
  if (router.scoring == RouterScoring::SparseMixer)
    return sparseMixer(router, numExperts, logits, nullptr, nullptr, weightGradients, logitGradients);
  const int64_t k = router.topK;
  thread_local std::vector<float> scoresBuffer, scoreGradientsBuffer;
  std::vector<float> &scores = scoresBuffer, &scoreGradients = scoreGradientsBuffer;
  computeScores(router, numExperts, logits, scores);
  // weights_i = scale * s_ci (/ (sum_k s_ck + 1e-20) when renormalised).
  const float scale = static_cast<float>(router.scalingFactor);
  scoreGradients.assign(static_cast<size_t>(numExperts), 0.0f);
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
