//===- RoutedExpertsTest.cpp - The CUDA decode's routing and plans, on the CPU -===//
//
// Part of moec. kernels/cuda/RoutedExperts.h is what the GPU's routing
// kernel runs, built here for the host: its choice of experts must be the
// engine's own (routeBlock, as the host-routed decode runs it), bit for
// bit with the CPU's exponentials, for every router kind; and its job
// tables, executed here by a plain interpreter of the kernels' contract,
// must compute the MoE block.
//
//===----------------------------------------------------------------------===//

#include "cuda/RoutedExperts.h"
#include "../../runtime/lib/EngineParts.h"
#include "../../runtime/lib/Kernels.h"
#include "../../runtime/lib/Router.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

using namespace moe;

namespace {

using HostMath = router::CpuMath;

/// WarpMath::topK (MatrixProducts.cu) played out lane by lane: at each
/// pick, 32 lanes' candidates (routing::laneCandidate) combined over the
/// butterfly of xor shuffles (routing::better); then every lane marks its
/// row taken and writes it out, as the kernel's lanes do (the last lane's
/// write stands). Returns whether the lanes agreed at every pick.
bool butterflyTopK(const float *values, int32_t count, int32_t k, int32_t *taken, int32_t *out) {
  for (int32_t i = 0; i < count; ++i)
    taken[i] = 0;
  bool agreed = true;
  for (int32_t pick = 0; pick < k; ++pick) {
    routing::Candidate lanes[32];
    for (int32_t lane = 0; lane < 32; ++lane)
      lanes[lane] = routing::laneCandidate(values, count, taken, lane, 32);
    for (int offset = 16; offset > 0; offset >>= 1) {
      routing::Candidate next[32];
      for (int lane = 0; lane < 32; ++lane)
        next[lane] = routing::better(lanes[lane], lanes[lane ^ offset]);
      std::copy(next, next + 32, lanes);
    }
    for (int lane = 0; lane < 32; ++lane) {
      agreed &= lanes[lane].index == lanes[0].index;
      if (lanes[lane].index >= 0) // the kernel would write taken[-1]
        taken[lanes[lane].index] = 1;
      if (out)
        out[pick] = lanes[lane].index;
    }
  }
  return agreed;
}

/// Whether no row or slot appears twice in `ids`.
bool allDistinct(std::vector<int32_t> ids) {
  std::sort(ids.begin(), ids.end());
  return std::adjacent_find(ids.begin(), ids.end()) == ids.end();
}

/// The CPU's routing with the routing kernel's top-k (butterflyTopK).
struct WarpTopKMath : HostMath {
  void topK(const float *values, int32_t count, int32_t k, int32_t *taken, int32_t *out) const {
    butterflyTopK(values, count, k, taken, out);
  }
};

struct RouterCase {
  const char *name;
  RouterSpec router;
  int64_t rows = 0, slots = 0;
  std::vector<int32_t> remap;
  double skipThreshold = 0;
  bool correctionBias = false;
  bool coarseLogits = false; ///< Multiples of 1/4: ties everywhere.
};

std::vector<RouterCase> routerCases() {
  std::vector<RouterCase> cases;
  RouterSpec r;
  r.topK = 2;
  r.normalizeTopK = true;
  cases.push_back({"mixtral", r, 8, 8});
  r.topK = 8;
  cases.push_back({"qwen3", r, 128, 128});
  cases.push_back({"qwen3 ties", r, 128, 128, {}, 0, false, true});
  r.normalizeTopK = false;
  cases.push_back({"olmoe", r, 64, 64});
  RouterSpec v3;
  v3.scoring = RouterScoring::Sigmoid;
  v3.selection = ExpertSelection::GroupLimitedTopTwoSum;
  v3.topK = 8;
  v3.numGroups = 8;
  v3.topKGroups = 4;
  v3.normalizeTopK = true;
  v3.scalingFactor = 2.5;
  v3.correctionBias = true;
  cases.push_back({"deepseek-v3", v3, 256, 256, {}, 0, true});
  cases.push_back({"deepseek-v3 ties", v3, 256, 256, {}, 0, true, true});
  RouterSpec v2;
  v2.selection = ExpertSelection::GroupLimitedMax;
  v2.topK = 6;
  v2.numGroups = 8;
  v2.topKGroups = 3;
  v2.scalingFactor = 16;
  cases.push_back({"deepseek-v2", v2, 160, 160});
  RouterSpec phi;
  phi.scoring = RouterScoring::SparseMixer;
  phi.topK = 2;
  phi.jitterEps = 0.01;
  cases.push_back({"phimoe sparsemixer", phi, 16, 16});
  cases.push_back({"phimoe sparsemixer ties", phi, 16, 16, {}, 0, false, true});
  // Merged experts: eight router rows served by five slots, with NAEE's
  // dynamic skipping on top-3.
  RouterSpec merged;
  merged.topK = 3;
  merged.normalizeTopK = true;
  cases.push_back({"merged + skip", merged, 8, 5, {0, 1, 1, 2, 3, 3, 4, 0}, 0.3});
  cases.push_back({"merged + skip ties", merged, 8, 5, {0, 1, 1, 2, 3, 3, 4, 0}, 0.3, false, true});
  return cases;
}

/// The CPU engine's router as it was written before its arithmetic moved to
/// kernels/common/Routing.h (std::partial_sort, sorted groups,
/// std::max_element): the oracle that the move changed no bit.
void referenceRoute(const RouterSpec &router, int64_t E, const float *logits, const float *bias, int32_t *chosen,
                    float *weights) {
  const float minusInfinity = -std::numeric_limits<float>::infinity();
  auto topK = [](const std::vector<float> &values, int64_t k, int32_t *out) {
    std::vector<int32_t> order(values.size());
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int32_t a, int32_t b) { return values[a] != values[b] ? values[a] > values[b] : a < b; });
    std::copy(order.begin(), order.begin() + k, out);
  };
  if (router.scoring == RouterScoring::SparseMixer) {
    std::vector<float> masked(logits, logits + E);
    const float threshold = static_cast<float>(2.0 * router.jitterEps);
    for (int pick = 0; pick < 2; ++pick) {
      const int32_t best = static_cast<int32_t>(std::max_element(masked.begin(), masked.end()) - masked.begin());
      const float top = masked[best];
      std::vector<float> gates(masked);
      for (int64_t j = 0; j < E; ++j)
        if ((top - logits[j]) / std::max(std::fabs(logits[j]), top) > threshold)
          gates[j] = minusInfinity;
      kernels::softmax(gates.data(), E);
      chosen[pick] = best;
      weights[pick] = gates[best];
      masked[best] = minusInfinity;
    }
    return;
  }
  std::vector<float> scores(logits, logits + E);
  if (router.scoring == RouterScoring::Softmax)
    kernels::softmax(scores.data(), E);
  else
    for (float &score : scores)
      score = kernels::sigmoid(score);
  std::vector<float> choice(scores);
  for (int64_t e = 0; e < E; ++e) {
    if (bias)
      choice[e] += bias[e];
    if (logits[e] == minusInfinity)
      choice[e] = minusInfinity;
  }
  if (router.selection != ExpertSelection::TopK) {
    const int64_t groups = router.numGroups, perGroup = E / groups;
    std::vector<float> groupScores(static_cast<size_t>(groups));
    for (int64_t g = 0; g < groups; ++g) {
      std::vector<float> members(choice.begin() + g * perGroup, choice.begin() + (g + 1) * perGroup);
      std::sort(members.begin(), members.end(), std::greater<float>());
      groupScores[g] =
          router.selection == ExpertSelection::GroupLimitedMax || perGroup == 1 || members[1] == minusInfinity
              ? members[0]
              : members[0] + members[1];
    }
    std::vector<int32_t> kept(static_cast<size_t>(router.topKGroups));
    topK(groupScores, router.topKGroups, kept.data());
    for (int64_t e = 0; e < E; ++e)
      if (std::find(kept.begin(), kept.end(), static_cast<int32_t>(e / perGroup)) == kept.end())
        choice[e] = minusInfinity;
  }
  topK(choice, router.topK, chosen);
  float sum = 0.0f;
  for (int64_t i = 0; i < router.topK; ++i) {
    weights[i] = scores[chosen[i]];
    sum += weights[i];
  }
  for (int64_t i = 0; i < router.topK; ++i) {
    if (router.normalizeTopK)
      weights[i] /= sum + 1e-20f;
    weights[i] *= static_cast<float>(router.scalingFactor);
  }
}

} // namespace

TEST(RoutedExperts, TheSharedRouterArithmeticIsTheEnginesAsItWas) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  for (const RouterCase &c : routerCases()) {
    SCOPED_TRACE(c.name);
    std::vector<float> bias;
    if (c.correctionBias)
      for (int64_t e = 0; e < c.rows; ++e)
        bias.push_back(0.1f * normal(rng));
    const int64_t k = c.router.topK;
    for (int token = 0; token < 300; ++token) {
      std::vector<float> logits(static_cast<size_t>(c.rows));
      for (float &l : logits)
        l = c.coarseLogits ? std::round(4 * normal(rng)) / 4 : normal(rng);
      // Some rows switched off (masked experts), as the engine's masks do.
      if (token % 3 == 0)
        logits[static_cast<size_t>(token) % logits.size()] = -std::numeric_limits<float>::infinity();
      std::vector<int32_t> chosen(k), expectedChosen(k);
      std::vector<float> weights(k), expectedWeights(k);
      const float *b = bias.empty() ? nullptr : bias.data();
      router::route(c.router, c.rows, logits.data(), b, chosen.data(), weights.data());
      referenceRoute(c.router, c.rows, logits.data(), b, expectedChosen.data(), expectedWeights.data());
      ASSERT_EQ(chosen, expectedChosen) << "token " << token;
      ASSERT_EQ(std::memcmp(weights.data(), expectedWeights.data(), k * sizeof(float)), 0) << "token " << token;
      // And NAEE's skipping.
      std::vector<float> skipped(weights), expectedSkipped(weights);
      router::skipWeakChoices(0.3, k, skipped.data());
      const int64_t first = std::max_element(expectedSkipped.begin(), expectedSkipped.end()) - expectedSkipped.begin();
      float before = 0, after = 0;
      for (int64_t i = 0; i < k; ++i) {
        before += expectedSkipped[i];
        if (i != first && expectedSkipped[i] < 0.3 * expectedSkipped[first])
          expectedSkipped[i] = 0;
        after += expectedSkipped[i];
      }
      if (after > 0)
        for (float &w : expectedSkipped)
          w *= before / after;
      ASSERT_EQ(std::memcmp(skipped.data(), expectedSkipped.data(), k * sizeof(float)), 0) << "token " << token;
    }
  }
}

TEST(RoutedExperts, AWarpsTopKPicksAsTheSerialOne) {
  // The routing kernel's top-k (butterflyTopK) must end every lane with
  // serialTopK's pick, NaN scores included (a NaN compared as a number
  // made lanes disagree: several rows taken a pick, and a pick of row -1
  // once every row was taken).
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN(), off = -std::numeric_limits<float>::infinity();
  for (int32_t count : {1, 7, 31, 32, 33, 64, 100, 256, 1024}) {
    for (int trial = 0; trial < 20; ++trial) {
      std::vector<float> values(static_cast<size_t>(count));
      for (float &v : values) // ties, and rows switched off, on purpose
        v = trial % 3 == 0 ? std::round(2 * normal(rng)) / 2 : normal(rng);
      if (trial % 4 == 1)
        for (int32_t i = 0; i < count; i += 3)
          values[i] = off;
      // NaN scores (an overflowed hidden state): some rows, or all.
      if (trial % 5 == 2)
        for (int32_t i = 1; i < count; i += 2)
          values[i] = nan;
      if (trial == 19)
        std::fill(values.begin(), values.end(), nan);
      const int32_t k = std::min(count, 1 + trial % 9);
      std::vector<int32_t> expected(k), taken(static_cast<size_t>(count)), picked(k);
      routing::serialTopK(values.data(), count, k, taken.data(), expected.data());
      ASSERT_TRUE(butterflyTopK(values.data(), count, k, taken.data(), picked.data()))
          << count << " rows, trial " << trial << ": the lanes disagreed";
      ASSERT_EQ(picked, expected) << count << " rows, trial " << trial;
      // k distinct rows: numbers first, then NaN rows, then rows switched off.
      ASSERT_TRUE(allDistinct(expected)) << count << " rows, trial " << trial;
      for (int32_t pick = 1; pick < k; ++pick)
        ASSERT_GE(routing::rankClass(values[expected[pick - 1]]), routing::rankClass(values[expected[pick]]))
            << count << " rows, trial " << trial << ", pick " << pick;
    }
  }
  // A NaN row goes before a row switched off.
  const float mixed[] = {off, nan, 1.0f, off};
  int32_t taken[4], out[3];
  routing::serialTopK(mixed, 4, 3, taken, out);
  EXPECT_EQ(std::vector<int32_t>(out, out + 3), (std::vector<int32_t>{2, 1, 0}));
}

TEST(RoutedExperts, TheDevicesChoiceIsTheEnginesForEveryRouterKind) {
  std::mt19937 rng(7);
  for (const RouterCase &c : routerCases()) {
    SCOPED_TRACE(c.name);
    ModelSpec spec;
    spec.router = c.router;
    LayerWeights w;
    w.router.rows = c.rows;
    w.experts.resize(static_cast<size_t>(c.slots));
    w.routing.remap = c.remap;
    w.routing.skipThreshold = c.skipThreshold;
    std::normal_distribution<float> normal(0.0f, 1.5f);
    if (c.correctionBias)
      for (int64_t e = 0; e < c.rows; ++e)
        w.routerCorrectionBias.push_back(0.1f * normal(rng));

    cuda::RoutedLayer layer;
    layer.router = router::params(c.router, c.rows);
    layer.skipThreshold = c.skipThreshold;
    layer.slots = static_cast<int32_t>(c.slots);
    layer.hasShared = 1;
    layer.remap = c.remap.empty() ? nullptr : c.remap.data();
    layer.correctionBias = c.correctionBias ? w.routerCorrectionBias.data() : nullptr;
    std::vector<float> scores(c.rows), choice(c.rows), groupScores(c.rows);
    std::vector<int32_t> taken(c.rows);
    const routing::Scratch scratch{scores.data(), choice.data(), groupScores.data(), taken.data()};

    detail::BlockRouting routing;
    int skippedSome = 0, mergedSome = 0;
    for (int token = 0; token < 300; ++token) {
      std::vector<float> logits(static_cast<size_t>(c.rows));
      for (float &l : logits)
        l = c.coarseLogits ? std::round(4 * normal(rng)) / 4 : normal(rng);
      // The last tokens' logits are NaN, some or all (an overflowed hidden
      // state): k distinct choices still, the same on every side.
      const bool nan = token >= 290;
      for (int64_t e = token % 2; nan && e < c.rows; e += token < 295 ? 2 : 1)
        logits[static_cast<size_t>(e)] = std::numeric_limits<float>::quiet_NaN();
      detail::routeBlock(spec, w, nullptr, 1, nullptr, routing, logits.data());
      if (nan) // k distinct choices
        EXPECT_TRUE(allDistinct({routing.chosen.begin(), routing.chosen.end()})) << "token " << token;
      // The host-routed decode's experts: slots in order, then the shared one.
      std::vector<int32_t> expectedSlots;
      std::vector<float> expectedWeights;
      for (int64_t e = 0; e < c.slots; ++e)
        if (!routing.tokensOf[e].empty()) {
          expectedSlots.push_back(static_cast<int32_t>(e));
          expectedWeights.push_back(routing.weightsOf[e][0]);
        }
      expectedSlots.push_back(static_cast<int32_t>(c.slots));
      expectedWeights.push_back(0.75f);
      skippedSome += !nan && std::count(routing.slotOfChoice.begin(), routing.slotOfChoice.end(), -1) > 0;
      mergedSome += !nan && static_cast<int>(expectedSlots.size()) - 1 < c.router.topK &&
                    std::count(routing.slotOfChoice.begin(), routing.slotOfChoice.end(), -1) == 0;
      // Both NaN passes where the logits hold a NaN.
      const auto same = [&](float a, float b) {
        return std::memcmp(&a, &b, 4) == 0 || (nan && std::isnan(a) && std::isnan(b));
      };

      int32_t slots[cuda::kMaxRouted];
      float weights[cuda::kMaxRouted];
      const int32_t count = cuda::selectExperts(layer, logits.data(), 0.75f, scratch, HostMath(), slots, weights);
      ASSERT_EQ(count, static_cast<int32_t>(expectedSlots.size())) << "token " << token;
      for (int32_t i = 0; i < count; ++i) {
        EXPECT_EQ(slots[i], expectedSlots[i]) << "token " << token << ", expert " << i;
        EXPECT_TRUE(same(weights[i], expectedWeights[i]))
            << "token " << token << ", expert " << i << ": " << weights[i] << " vs " << expectedWeights[i];
      }
      // The routing kernel's top-k (its lanes played out) picks the same.
      int32_t warpSlots[cuda::kMaxRouted];
      float warpWeights[cuda::kMaxRouted];
      ASSERT_EQ(cuda::selectExperts(layer, logits.data(), 0.75f, scratch, WarpTopKMath(), warpSlots, warpWeights),
                count)
          << "token " << token;
      for (int32_t i = 0; i < count; ++i) {
        EXPECT_EQ(warpSlots[i], slots[i]) << "token " << token << ", expert " << i;
        EXPECT_TRUE(same(warpWeights[i], weights[i])) << "token " << token << ", expert " << i;
      }
      // The GPU's exponentials (DeviceMath: a scalar softmax with expf; the
      // kernel's WarpMath selects exactly as it does and sums in another
      // order) pick the same experts (choices follow the logits, or scores
      // that tie exactly where the logits do) with weights equal to a few ulps.
      const int32_t deviceCount =
          cuda::selectExperts(layer, logits.data(), 0.75f, scratch, cuda::DeviceMath(), slots, weights);
      ASSERT_EQ(deviceCount, count) << "token " << token;
      for (int32_t i = 0; i < count; ++i) {
        EXPECT_EQ(slots[i], expectedSlots[i]) << "token " << token << ", expert " << i;
        if (nan && std::isnan(expectedWeights[i]))
          EXPECT_TRUE(std::isnan(weights[i])) << "token " << token << ", expert " << i;
        else
          EXPECT_NEAR(weights[i], expectedWeights[i], 1e-6 * std::fabs(expectedWeights[i]) + 1e-9)
              << "token " << token << ", expert " << i;
      }
      if (nan) {
        // Every slot a real one (the shared expert last), none twice.
        EXPECT_TRUE(allDistinct({slots, slots + count})) << "token " << token;
        EXPECT_GE(*std::min_element(slots, slots + count), 0) << "token " << token;
        EXPECT_LE(*std::max_element(slots, slots + count), static_cast<int32_t>(c.slots)) << "token " << token;
      }
    }
    if (c.skipThreshold > 0) {
      EXPECT_GT(skippedSome, 0) << "the case exercises dynamic skipping";
      EXPECT_GT(mergedSome, 0) << "the case exercises merged slots";
    }
  }
}

namespace {

/// The interpreters' steps (below), each as the kernels' contract says
/// (RoutedExperts.h, MatrixProducts.cu) for f32 matrices: row r of a
/// one-token product job; SwiGLU of a SwiGLU job's values [begin, end)
/// into h; row r of the weighted sum onto the residual stream.
void productRow(const cuda::ProductJob &job, int64_t r) {
  ASSERT_EQ(job.layout, 0);
  ASSERT_EQ(job.tokens, 1);
  const float *w = reinterpret_cast<const float *>(job.w);
  float dot = 0;
  for (int64_t c = 0; c < job.cols; ++c)
    dot += w[r * job.cols + c] * job.x[c];
  job.y[r] = dot;
}
void swigluValues(const cuda::QuantJob &job, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) {
    const float g = job.x[c];
    job.h[c] = g / (1.0f + std::exp(-g)) * job.up[c];
  }
}
void sumRow(const cuda::RoutedPlan &plan, const float *parts, float *residual, int64_t hidden, int64_t r) {
  float total = 0;
  for (int32_t i = 0; i < plan.count; ++i)
    total += plan.weights[i] * parts[i * hidden + r];
  residual[r] += total;
}

/// Runs a plan's five launches: each product job's rows, silu(gate) * up
/// over the intermediates, each down job, the weighted sum.
void interpret(const cuda::RoutedPlan &plan, const cuda::RoutedScratch &scratch, int64_t hidden) {
  auto product = [](const cuda::ProductJob &job) {
    for (int64_t r = 0; r < job.rows; ++r)
      productRow(job, r);
  };
  int64_t rows = 0;
  for (int32_t j = 0; j < plan.first.count; ++j) {
    EXPECT_EQ(plan.firstJobs[j].first, rows);
    rows += plan.firstJobs[j].rows;
    product(plan.firstJobs[j]);
  }
  EXPECT_EQ(rows, plan.first.total);
  // SwiGLU: each down job's warps over its expert's intermediates (f32
  // downs read h, so nothing is rounded).
  int64_t warps = 0;
  for (int32_t j = 0; j < plan.downQuant.count; ++j) {
    const cuda::QuantJob &job = plan.downJobs[j];
    EXPECT_EQ(job.first, warps);
    EXPECT_EQ(job.values, nullptr);
    EXPECT_EQ(job.group, cuda::kSwigluChunk);
    ASSERT_NE(job.up, nullptr);
    ASSERT_NE(job.h, nullptr);
    EXPECT_EQ(job.groups, (job.cols + job.group - 1) / job.group);
    warps += job.groups;
    swigluValues(job, 0, job.cols);
  }
  EXPECT_EQ(warps, plan.downQuant.total);
  rows = 0;
  for (int32_t j = 0; j < plan.second.count; ++j) {
    EXPECT_EQ(plan.secondJobs[j].first, rows);
    rows += plan.secondJobs[j].rows;
    product(plan.secondJobs[j]);
  }
  EXPECT_EQ(rows, plan.second.total);
  EXPECT_EQ(plan.combine.count, plan.count);
  for (int64_t r = 0; r < hidden; ++r)
    sumRow(plan, scratch.parts, scratch.residual, hidden, r);
}

/// Runs a plan as its three fused launches would (RoutedFusion: gate and
/// up, then down, each row counted where arrivalOf says and the row that
/// completes a set running what reads it: SwiGLU over a group of a down
/// input, a row's weighted sum), rows in reverse order. Every set
/// completes once and leaves its count at zero.
void interpretFused(const cuda::RoutedPlan &plan, const cuda::RoutedScratch &scratch, int64_t hidden) {
  const cuda::RoutedFusion thenSwiglu{cuda::RoutedFusion::kThenSwiglu, &plan, scratch.groupArrivals};
  const cuda::RoutedFusion thenSum{
      cuda::RoutedFusion::kThenSum, &plan, scratch.rowArrivals, scratch.parts, scratch.residual, hidden};
  std::vector<int64_t> groups(static_cast<size_t>(plan.downQuant.total)), rows(static_cast<size_t>(hidden));
  auto run = [&](const cuda::RoutedFusion &f, const cuda::ProductJob *jobs, int32_t count, int64_t totalRows) {
    for (int64_t warp = totalRows - 1; warp >= 0; --warp) {
      int32_t j = 0;
      while (j + 1 < count && jobs[j + 1].first <= warp)
        ++j;
      const int64_t r = warp - jobs[j].first;
      productRow(jobs[j], r);
      const cuda::Arrival arrival = cuda::arrivalOf(f, j, r);
      ASSERT_GT(arrival.target, 0u);
      if (++f.arrivals[arrival.index] < arrival.target)
        continue;
      ASSERT_EQ(f.arrivals[arrival.index], arrival.target) << "a set counted past its rows";
      f.arrivals[arrival.index] = 0;
      if (f.stage == cuda::RoutedFusion::kThenSwiglu) {
        const cuda::QuantJob &q = plan.downJobs[j / 2];
        ASSERT_GE(arrival.index, q.first);
        const int64_t k = arrival.index - q.first;
        ASSERT_LT(k, q.groups);
        ++groups[static_cast<size_t>(arrival.index)];
        swigluValues(q, k * q.group, std::min<int64_t>(q.cols, (k + 1) * q.group));
      } else {
        ++rows[static_cast<size_t>(r)];
        sumRow(plan, f.parts, f.residual, f.hidden, r);
      }
    }
  };
  run(thenSwiglu, plan.firstJobs, plan.first.count, plan.first.total);
  run(thenSum, plan.secondJobs, plan.second.count, plan.second.total);
  for (size_t k = 0; k < groups.size(); ++k)
    EXPECT_EQ(groups[k], 1) << "SwiGLU group " << k;
  for (size_t r = 0; r < rows.size(); ++r)
    EXPECT_EQ(rows[r], 1) << "output row " << r;
}

/// A token's intermediates in host memory (64 values each, the output
/// and the residual stream of H) and the scratch that points at them,
/// with the fused launches' counts where `fused`.
struct HostAreas {
  std::vector<float> residual, gateOut, upOut, h, parts;
  std::vector<unsigned> groupArrivals, rowArrivals;
  cuda::RoutedScratch scratch;
  HostAreas(const std::vector<float> &input, int64_t H, bool fused)
      : residual(static_cast<size_t>(H), 0.5f), gateOut(64), upOut(64), h(64), parts(static_cast<size_t>(4 * H)) {
    scratch.input = input.data();
    scratch.residual = residual.data();
    scratch.gateOut = gateOut.data();
    scratch.upOut = upOut.data();
    scratch.h = h.data();
    scratch.parts = parts.data();
    if (fused) {
      groupArrivals.assign(64, 0);
      rowArrivals.assign(static_cast<size_t>(H), 0);
      scratch.groupArrivals = groupArrivals.data();
      scratch.rowArrivals = rowArrivals.data();
    }
  }
};

cuda::ProductJob floatTemplate(const std::vector<float> &w, int64_t rows, int64_t cols) {
  cuda::ProductJob job{};
  job.w = reinterpret_cast<const uint8_t *>(w.data());
  job.rows = rows;
  job.cols = cols;
  job.layout = 0;
  job.vectorized = cols % 4 == 0;
  return job;
}

} // namespace

TEST(RoutedExperts, APlanComputesTheBlockOfExpertsOfDifferentWidths) {
  // Five slots of widths 6, 12, 4, 8, 7 and a shared expert of 10.
  const int64_t H = 12;
  const std::vector<int64_t> widths = {6, 12, 4, 8, 7, 10};
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  auto random = [&](int64_t n) {
    std::vector<float> v(static_cast<size_t>(n));
    for (float &x : v)
      x = normal(rng);
    return v;
  };
  std::vector<std::vector<float>> gates, ups, downs;
  std::vector<cuda::ExpertTemplate> templates;
  for (int64_t width : widths) {
    gates.push_back(random(width * H));
    ups.push_back(random(width * H));
    downs.push_back(random(H * width));
  }
  for (size_t e = 0; e < widths.size(); ++e)
    templates.push_back({floatTemplate(gates[e], widths[e], H), floatTemplate(ups[e], widths[e], H),
                         floatTemplate(downs[e], H, widths[e])});
  cuda::RoutedLayer layer;
  layer.slots = 5;
  layer.hasShared = 1;
  layer.hidden = H;
  layer.experts = templates.data();
  const std::vector<float> input = random(H);

  // Two tokens' experts (the shared one, slot 5, last), and whether each
  // down product may read its slice of h four floats at a time: only where
  // its width is a multiple of 4 and the slice starts 16-byte aligned
  // (slot 1 at offset 6 in the second).
  const std::vector<std::vector<int32_t>> tokens = {{1, 3, 4, 5}, {0, 1, 3, 5}};
  const std::vector<std::vector<int>> vectorized = {{1, 1, 0, 0}, {0, 0, 0, 0}};
  for (size_t t = 0; t < tokens.size(); ++t) {
    SCOPED_TRACE(t);
    const std::vector<int32_t> &slots = tokens[t];
    const float weights[] = {0.5f, 0.25f, 0.125f, 0.8f};
    HostAreas apart(input, H, false);
    const cuda::RoutedScratch &scratch = apart.scratch;
    auto plan = std::make_unique<cuda::RoutedPlan>();
    cuda::planRoutedExperts(layer, scratch, 4, slots.data(), weights, *plan);
    EXPECT_EQ(plan->count, 4);
    EXPECT_EQ(plan->downQuant.count, 4) << "every expert's SwiGLU";
    int64_t width = 0;
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(plan->slots[i], slots[i]);
      EXPECT_EQ(plan->secondJobs[i].vectorized, vectorized[t][i]) << "expert " << i;
      EXPECT_EQ(plan->downJobs[i].x, scratch.gateOut + width);
      EXPECT_EQ(plan->downJobs[i].up, scratch.upOut + width);
      EXPECT_EQ(plan->downJobs[i].h, scratch.h + width);
      width += widths[static_cast<size_t>(slots[i])];
    }
    interpret(*plan, scratch, H);

    // The same plan run as the fused launches: SwiGLU and the sum run by
    // the rows that complete their inputs, in the same arithmetic; the
    // counts back at zero after.
    HostAreas fused(input, H, true);
    auto fusedPlan = std::make_unique<cuda::RoutedPlan>();
    cuda::planRoutedExperts(layer, fused.scratch, 4, slots.data(), weights, *fusedPlan);
    interpretFused(*fusedPlan, fused.scratch, H);
    EXPECT_EQ(fused.residual, apart.residual) << "fused and apart add the same values in the same order";
    EXPECT_EQ(std::count(fused.groupArrivals.begin(), fused.groupArrivals.end(), 0u), 64);
    EXPECT_EQ(std::count(fused.rowArrivals.begin(), fused.rowArrivals.end(), 0u), H);

    // The block computed directly.
    for (int64_t r = 0; r < H; ++r) {
      double expected = 0.5;
      for (int i = 0; i < 4; ++i) {
        const size_t e = static_cast<size_t>(slots[i]);
        const int64_t w = widths[e];
        double d = 0;
        for (int64_t c = 0; c < w; ++c) {
          double g = 0, u = 0;
          for (int64_t k = 0; k < H; ++k) {
            g += gates[e][c * H + k] * input[k];
            u += ups[e][c * H + k] * input[k];
          }
          d += downs[e][r * w + c] * (g / (1 + std::exp(-g)) * u);
        }
        expected += weights[i] * d;
      }
      EXPECT_NEAR(apart.residual[r], expected, 1e-5) << "row " << r;
    }
  }
}

TEST(RoutedExperts, GroupFormatJobsReadTheQuantizationOfTheirGroupSize) {
  // Gate in groups of 64, up in groups of 128 (two input quantizations),
  // down in groups of 32 for one expert and bf16 for the other.
  const int64_t H = 256;
  auto group = [](int64_t rows, int64_t cols, int g) {
    cuda::ProductJob job{};
    job.layout = cuda::kGroupLayout;
    job.rows = rows;
    job.cols = cols;
    job.bits = 4;
    job.group = g;
    job.groups = (cols + g - 1) / g;
    return job;
  };
  cuda::ProductJob bf16{};
  bf16.layout = 1;
  bf16.rows = H;
  bf16.cols = 40;
  bf16.vectorized = 1;
  std::vector<cuda::ExpertTemplate> templates = {
      {group(96, H, 64), group(96, H, 128), group(H, 96, 32), 0, 1},
      {group(40, H, 64), group(40, H, 128), bf16, 0, 1},
  };
  cuda::RoutedLayer layer;
  layer.slots = 2;
  layer.hidden = H;
  layer.experts = templates.data();
  layer.inputGroups = 2;
  layer.inputGroupSize[0] = 64;
  layer.inputGroupSize[1] = 128;
  // Areas as distinct fake addresses: the plan only does arithmetic on them.
  std::vector<int8_t> values(4096);
  std::vector<float> floats(8192);
  cuda::RoutedScratch s;
  s.input = floats.data();
  s.inputValues = values.data();
  s.inputValueStride = 512;
  s.inputScales = floats.data() + 256;
  s.inputSums = floats.data() + 512;
  s.inputGroupStride = 64;
  s.gateOut = floats.data() + 1024;
  s.upOut = floats.data() + 2048;
  s.h = floats.data() + 3072;
  s.downValues = values.data() + 2048;
  s.downValueStride = 256;
  s.downScales = floats.data() + 4096;
  s.downSums = floats.data() + 4608;
  s.downGroupStride = 64;
  s.parts = floats.data() + 5120;
  const int32_t slots[] = {0, 1};
  const float weights[] = {0.6f, 0.4f};
  auto plan = std::make_unique<cuda::RoutedPlan>();
  cuda::planRoutedExperts(layer, s, 2, slots, weights, *plan);

  // The input rounded at each size (by the routing kernel): 256 / 64 then
  // 256 / 128 groups, each size in its own areas.
  for (int32_t g = 0; g < 2; ++g) {
    const cuda::QuantJob &job = plan->inputJobs[g];
    EXPECT_EQ(job.x, s.input);
    EXPECT_EQ(job.cols, H);
    EXPECT_EQ(job.group, g == 0 ? 64 : 128);
    EXPECT_EQ(job.groups, g == 0 ? 4 : 2);
    EXPECT_EQ(job.up, nullptr);
    EXPECT_EQ(job.sums, s.inputSums + g * 64);
  }
  EXPECT_EQ(plan->inputJobs[1].first, 4);
  EXPECT_EQ(plan->inputJobs[1].values, values.data() + 512);
  EXPECT_EQ(plan->inputJobs[1].scales, s.inputScales + 64);
  for (int i = 0; i < 2; ++i) {
    const cuda::ProductJob &gate = plan->firstJobs[2 * i], &up = plan->firstJobs[2 * i + 1];
    EXPECT_EQ(gate.q, plan->inputJobs[0].values) << "gate reads groups of 64";
    EXPECT_EQ(gate.qSums, plan->inputJobs[0].sums);
    EXPECT_EQ(up.q, plan->inputJobs[1].values) << "up reads groups of 128";
    EXPECT_EQ(up.qScales, plan->inputJobs[1].scales);
  }
  EXPECT_EQ(plan->firstJobs[2].y, s.gateOut + 96);
  EXPECT_EQ(plan->firstJobs[3].first, 2 * 96 + 40);
  EXPECT_EQ(plan->first.total, 2 * (96 + 40));
  // Each expert's SwiGLU from its gate and up slices: the first's
  // rounded in groups of 32 for its down (3 warps, h not written), the
  // bf16 one's written to h (a warp per kSwigluChunk values: 1).
  EXPECT_EQ(plan->downQuant.count, 2);
  EXPECT_EQ(plan->downQuant.total, 3 + 1);
  EXPECT_EQ(plan->downJobs[0].x, s.gateOut);
  EXPECT_EQ(plan->downJobs[0].up, s.upOut);
  EXPECT_EQ(plan->downJobs[0].h, nullptr);
  EXPECT_EQ(plan->downJobs[0].cols, 96);
  EXPECT_EQ(plan->downJobs[0].group, 32);
  EXPECT_EQ(plan->secondJobs[0].q, plan->downJobs[0].values);
  EXPECT_EQ(plan->downJobs[1].x, s.gateOut + 96);
  EXPECT_EQ(plan->downJobs[1].up, s.upOut + 96);
  EXPECT_EQ(plan->downJobs[1].h, s.h + 96);
  EXPECT_EQ(plan->downJobs[1].values, nullptr);
  EXPECT_EQ(plan->downJobs[1].first, 3);
  EXPECT_EQ(cuda::downInputWarps(templates[0]) + cuda::downInputWarps(templates[1]), 3 + 1);
  // The bf16 down reads h from offset 96 (aligned), its output the second part.
  EXPECT_EQ(plan->secondJobs[1].x, s.h + 96);
  EXPECT_EQ(plan->secondJobs[1].ldx, 40);
  EXPECT_TRUE(plan->secondJobs[1].vectorized);
  EXPECT_EQ(plan->secondJobs[1].y, s.parts + H);
  EXPECT_EQ(plan->second.total, 2 * H);
  EXPECT_EQ(plan->combine.count, 2);
  EXPECT_EQ(plan->weights[1], 0.4f);

  // Fused (RoutedFusion), the sets the rows count in: the first expert's
  // three groups of 32 (rows of gate and of up, 64 each: its row 95 in
  // the third), the bf16 one's 40 values in one chunk of 128 (80 rows,
  // after the three); an output row, both experts' rows.
  const cuda::RoutedFusion thenSwiglu{cuda::RoutedFusion::kThenSwiglu, plan.get()};
  const int64_t rows[] = {0, 31, 32, 95};
  const int64_t groups[] = {0, 0, 1, 2};
  for (int i = 0; i < 4; ++i)
    for (int job = 0; job < 2; ++job) {
      const cuda::Arrival a = cuda::arrivalOf(thenSwiglu, job, rows[i]);
      EXPECT_EQ(a.index, groups[i]) << "row " << rows[i];
      EXPECT_EQ(a.target, 64u);
    }
  for (int job = 2; job < 4; ++job) {
    EXPECT_EQ(cuda::arrivalOf(thenSwiglu, job, 39).index, 3);
    EXPECT_EQ(cuda::arrivalOf(thenSwiglu, job, 0).target, 80u);
  }
  const cuda::RoutedFusion thenSum{cuda::RoutedFusion::kThenSum, plan.get()};
  EXPECT_EQ(cuda::arrivalOf(thenSum, 1, 255).index, 255);
  EXPECT_EQ(cuda::arrivalOf(thenSum, 0, 7).target, 2u);
}

// A prefill's MoE block on the device (Context::routedExperts): the experts'
// rows gathered one expert after another, and each token's weighted sum as
// the CPU engine's detail::addRoutedOutputs adds it (zero, then each
// expert's weight * output in expert order), bit for bit. Experts of no tokens, tokens
// of no expert, tokens listed in no particular order.
TEST(RoutedExperts, APrefillBlocksWeightedSumsAreTheEngines) {
  std::mt19937 rng(8);
  const int64_t tokens = 50, hidden = 7;
  const int64_t counts[] = {12, 0, 49, 1, 30, 7};
  std::vector<std::vector<int32_t>> tokensOf;
  std::vector<std::vector<float>> weightsOf;
  std::vector<cuda::ExpertRows> experts;
  std::vector<int32_t> order(static_cast<size_t>(tokens - 1)); // token 49 goes to no expert
  std::iota(order.begin(), order.end(), 0);
  std::normal_distribution<float> normal;
  for (int64_t count : counts) {
    std::shuffle(order.begin(), order.end(), rng);
    tokensOf.emplace_back(order.begin(), order.begin() + count);
    weightsOf.emplace_back();
    for (int64_t r = 0; r < count; ++r)
      weightsOf.back().push_back(std::fabs(normal(rng)));
  }
  for (size_t i = 0; i < tokensOf.size(); ++i)
    experts.push_back({tokensOf[i].data(), weightsOf[i].data(), static_cast<int64_t>(tokensOf[i].size())});
  const cuda::BlockSums sums = cuda::blockSums(tokens, experts.data(), experts.size());
  const int64_t rows = static_cast<int64_t>(sums.rowToken.size());
  std::vector<float> y(static_cast<size_t>(rows * hidden));
  for (float &v : y)
    v = normal(rng);
  // The engine's own weighted sums, over the rows as the device gathers them.
  std::vector<float> expected(static_cast<size_t>(tokens * hidden));
  detail::addRoutedOutputs(tokensOf, weightsOf, y.data(), tokens, hidden, expected.data());
  int64_t row = 0;
  for (size_t i = 0; i < tokensOf.size(); ++i)
    for (size_t r = 0; r < tokensOf[i].size(); ++r, ++row)
      EXPECT_EQ(sums.rowToken[row], tokensOf[i][r]) << "expert " << i << " row " << r;
  ASSERT_EQ(row, rows);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < hidden; ++c) {
      const float got = cuda::blockWeightedSum(y.data(), sums.starts.data(), sums.entryRow.data(),
                                               sums.entryWeight.data(), hidden, t, c);
      EXPECT_EQ(std::memcmp(&got, &expected[t * hidden + c], sizeof(float)), 0)
          << "token " << t << " column " << c << ": " << got << " against " << expected[t * hidden + c];
    }
  EXPECT_EQ(sums.starts[tokens - 1], sums.starts[tokens]) << "token 49 has no expert";
}
