//===- Routing.h - One token's expert selection, on host and GPU -*- C++ -*-===//
//
// Part of moec. The arithmetic of every router kind (hf-moe-formats.md
// section 13 and the transformers implementations), written once for the
// CPU engine (runtime/lib/Router.cpp) and the CUDA decode
// (kernels/cuda/RoutedExperts.h): softmax or sigmoid scores, plain or
// group-limited top-k, DeepSeek-V3's correction bias (for choosing only),
// renormalisation, routed scaling, PhiMoE's sparsemixer in evaluation mode
// and NAEE's dynamic skipping. The exponentials come from a `Math` policy
// (the CPU's vectorised softmax, the GPU's expf), so each side keeps its
// own rounding of e^x; everything else is the same operations in the same
// order. Header-only, no allocation: callers pass scratch arrays of the
// router's row count.
//
// The policy also selects (topK) and orders phases (sync), so that a GPU
// warp can run a token's routing together: every lane runs these functions
// and writes the same value wherever it writes (never reading back a
// location it changes in place), the policy's softmax and topK share the
// work among the lanes, and sync() orders one phase's reads of scratch
// before the next phase's writes. On the CPU, topK is serialTopK and sync
// does nothing.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_COMMON_ROUTING_H
#define MOE_KERNELS_COMMON_ROUTING_H

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif

namespace moe::routing {

/// A router's settings as plain numbers (RouterSpec, which lives in the
/// frontend, maps onto it): what a GPU kernel can take by value.
struct RouterParams {
  int32_t rows = 0;      ///< Router rows E (expert ids 0..E-1).
  int32_t topK = 0;      ///< Experts per token (2 for sparsemixer).
  int32_t scoring = 0;   ///< 0 softmax, 1 sigmoid, 2 sparsemixer (RouterScoring's order).
  int32_t selection = 0; ///< 0 top-k, 1 group-limited max, 2 group-limited top-two sum (ExpertSelection's order).
  int32_t groups = 1, topKGroups = 1;
  int32_t normalize = 0; ///< Renormalise the chosen weights to sum 1.
  float scaling = 1.0f;  ///< Multiplies the routed weights.
  float jitterBound = 0; ///< Sparsemixer: 2 * jitter_eps.
};

enum : int32_t { kSoftmax = 0, kSigmoid = 1, kSparseMixer = 2 };
enum : int32_t { kTopK = 0, kGroupLimitedMax = 1, kGroupLimitedTopTwoSum = 2 };

/// Scratch for one token: each array holds `rows` entries.
struct Scratch {
  float *scores;      ///< Softmax or sigmoid of the logits (sparsemixer: the masked logits).
  float *choice;      ///< What top-k ranks (sparsemixer: one pick's gates).
  float *groupScores; ///< Group-limited selection (its first `groups` entries).
  int32_t *taken;     ///< Flags of a top-k in progress.
};

/// Whether top-k ranks `a` before `b`: -inf (a row switched off, or
/// outside the kept groups) below everything, then NaN, then the numbers
/// by value; for numbers, a > b. A strict weak order (NaNs tie, as do -0
/// and +0), so with ties to the lower index a NaN score (an overflowed
/// hidden state) still gives k distinct rows, the same on every lane of a
/// warp that picks together (better) as on the host, and never a row
/// switched off while a NaN row is left. rankClass: 0, 1 and 2 for those.
MOE_HOST_DEVICE inline int rankClass(float v) { return v == -INFINITY ? 0 : v != v ? 1 : 2; }
MOE_HOST_DEVICE inline bool ranksAbove(float a, float b) {
  const int ra = rankClass(a), rb = rankClass(b);
  return ra != rb ? ra > rb : ra == 2 && a > b;
}

/// Indices of the k largest of `values[0..count)` (ranksAbove), largest
/// first, ties to the lower index (the order std::partial_sort gives with
/// that comparison), into `out` unless null; `taken[i]` is 1 for those
/// chosen.
MOE_HOST_DEVICE inline void serialTopK(const float *values, int32_t count, int32_t k, int32_t *taken, int32_t *out) {
  for (int32_t i = 0; i < count; ++i)
    taken[i] = 0;
  for (int32_t pick = 0; pick < k; ++pick) {
    int32_t best = -1;
    for (int32_t i = 0; i < count; ++i)
      if (!taken[i] && (best < 0 || ranksAbove(values[i], values[best])))
        best = i;
    taken[best] = 1;
    if (out)
      out[pick] = best;
  }
}

/// A top-k pick's candidate: a row and its value (index -1: none yet).
struct Candidate {
  int32_t index = -1;
  float value = 0.0f;
};

/// Of two candidates, the one serialTopK picks first: the one ranked above
/// (ranksAbove), of equals (neither above: equal values, or two NaNs) the
/// lower index. Commutative and associative, so lanes that combine their
/// candidates in any order agree.
MOE_HOST_DEVICE inline Candidate better(Candidate a, Candidate b) {
  return b.index >= 0 &&
                 (a.index < 0 || ranksAbove(b.value, a.value) || (!ranksAbove(a.value, b.value) && b.index < a.index))
             ? b
             : a;
}

/// Lane `lane` of `lanes`' candidate: its largest untaken row of rows
/// lane, lane + lanes, ... (the first of equals).
MOE_HOST_DEVICE inline Candidate laneCandidate(const float *values, int32_t count, const int32_t *taken, int32_t lane,
                                               int32_t lanes) {
  Candidate best;
  for (int32_t i = lane; i < count; i += lanes)
    if (!taken[i] && (best.index < 0 || ranksAbove(values[i], best.value)))
      best = {i, values[i]};
  return best;
}

/// Every row's score: softmax over the logits, or the sigmoid of each.
template <class Math>
MOE_HOST_DEVICE void computeScores(const RouterParams &p, const float *logits, float *scores, const Math &math) {
  for (int32_t e = 0; e < p.rows; ++e)
    scores[e] = p.scoring == kSoftmax ? logits[e] : math.sigmoid(logits[e]);
  if (p.scoring == kSoftmax)
    math.softmax(scores, p.rows);
}

/// One sparsemixer pick: the largest of `masked` (ranksAbove; -inf at
/// experts picked before; the first of equals), and in `gates` the softmax over the logits
/// within 2 * jitter (relative) of it. Returns the pick.
template <class Math>
MOE_HOST_DEVICE int32_t sparseMixerPick(const RouterParams &p, const float *logits, const float *masked, float *gates,
                                        const Math &math) {
  math.sync(); // the last pick's gates are read
  int32_t best = 0;
  for (int32_t e = 1; e < p.rows; ++e)
    if (ranksAbove(masked[e], masked[best]))
      best = e;
  const float top = masked[best];
  for (int32_t j = 0; j < p.rows; ++j) {
    const float magnitude = fabsf(logits[j]);
    const float factor = magnitude < top ? top : magnitude;
    gates[j] = (top - logits[j]) / factor > p.jitterBound ? -INFINITY : masked[j];
  }
  math.softmax(gates, p.rows);
  return best;
}

/// Chooses p.topK experts for one token from its router `logits` (a row at
/// -inf is switched off: never chosen while another is left), with the
/// family's scoring, group limits, correction `bias` (null when absent),
/// renormalisation and scaling. Writes ids and weights.
template <class Math>
MOE_HOST_DEVICE void route(const RouterParams &p, const float *logits, const float *bias, const Scratch &s,
                           int32_t *chosen, float *weights, const Math &math) {
  const int32_t rows = p.rows, k = p.topK;
  if (p.scoring == kSparseMixer) {
    float *masked = s.scores, *gates = s.choice;
    for (int32_t e = 0; e < rows; ++e)
      masked[e] = logits[e];
    for (int32_t pick = 0; pick < 2; ++pick) {
      const int32_t best = sparseMixerPick(p, logits, masked, gates, math);
      chosen[pick] = best;
      weights[pick] = gates[best];
      masked[best] = -INFINITY;
    }
    return;
  }
  computeScores(p, logits, s.scores, math);
  // A masked row is never chosen, whatever its correction bias:
  // sigmoid(-inf) + bias would otherwise take a slot with weight 0.
  for (int32_t e = 0; e < rows; ++e)
    s.choice[e] = logits[e] == -INFINITY ? -INFINITY : bias ? s.scores[e] + bias[e] : s.scores[e];
  if (p.selection != kTopK) {
    const int32_t groups = p.groups, perGroup = rows / groups;
    for (int32_t g = 0; g < groups; ++g) {
      // The group's largest and second largest (a sort's first two).
      float first = -INFINITY, second = -INFINITY;
      for (int32_t m = g * perGroup; m < (g + 1) * perGroup; ++m) {
        const float v = s.choice[m];
        if (v > first) {
          second = first;
          first = v;
        } else if (v > second) {
          second = v;
        }
      }
      // A masked member adds nothing to the top-two sum (a group with none
      // left is never kept).
      s.groupScores[g] =
          p.selection == kGroupLimitedMax || perGroup == 1 || second == -INFINITY ? first : first + second;
    }
    // The kept groups' flags, read before the top-k below reuses them.
    math.topK(s.groupScores, groups, p.topKGroups, s.taken, nullptr);
    for (int32_t e = 0; e < rows; ++e)
      if (!s.taken[e / perGroup])
        s.choice[e] = -INFINITY;
  }
  math.topK(s.choice, rows, k, s.taken, chosen);
  float sum = 0.0f;
  for (int32_t i = 0; i < k; ++i) {
    weights[i] = s.scores[chosen[i]];
    sum += weights[i];
  }
  for (int32_t i = 0; i < k; ++i) {
    if (p.normalize)
      weights[i] /= sum + 1e-20f;
    weights[i] *= p.scaling;
  }
}

/// NAEE's dynamic skipping (`threshold` > 0, k > 1): zeroes every weight
/// below threshold times the largest and rescales the rest to the old sum.
MOE_HOST_DEVICE inline void skipWeakChoices(double threshold, int32_t k, float *weights) {
  if (!(threshold > 0) || k < 2)
    return;
  int32_t first = 0; // the first of the largest, as std::max_element
  for (int32_t i = 1; i < k; ++i)
    if (weights[first] < weights[i])
      first = i;
  float before = 0, after = 0;
  for (int32_t i = 0; i < k; ++i) {
    before += weights[i];
    if (i != first && weights[i] < threshold * weights[first])
      weights[i] = 0;
    after += weights[i];
  }
  if (after > 0)
    for (int32_t i = 0; i < k; ++i)
      weights[i] *= before / after;
}

} // namespace moe::routing

#endif // MOE_KERNELS_COMMON_ROUTING_H
