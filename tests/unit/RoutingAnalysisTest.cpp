//===- RoutingAnalysisTest.cpp - SRP, SCH and usage with known answers ----===//
//
// Part of moec. The measures on hand-worked sequences, against brute force
// on random ones, and on the fixtures: what the recorder sees is what the
// engine routed (evaluation's independent routing counts), and a model
// whose routing is known (every expert but top-k masked) scores perfectly.
//
//===----------------------------------------------------------------------===//

#include "moe/Calibration/RoutingAnalysis.h"
#include "moe/Runtime/Model.h"

#include "TestSupport.h"

#include <cmath>
#include <random>

using namespace moe;
using namespace moe::testing;

namespace {

TokenSets sequence(const std::vector<std::vector<int32_t>> &tokens) {
  TokenSets sets;
  for (const std::vector<int32_t> &set : tokens)
    sets.add(set);
  return sets;
}

SegmentRouting srp(const TokenSets &sets, int64_t experts, int64_t m) {
  SegmentCounts counts;
  countSegments(sets, experts, m, counts);
  return bestSegmentRouting(counts);
}

/// SRP by enumeration: every segment, every threshold, the F1 of the
/// pooled predictions.
double bruteForceSrp(const TokenSets &sets, int64_t experts, int64_t m) {
  double best = 0;
  for (int64_t t = 0; t <= m; ++t) {
    double covered = 0, predicted = 0, actual = 0;
    for (int64_t begin = 0; begin + m <= sets.tokens(); ++begin) {
      std::vector<int64_t> count(static_cast<size_t>(experts), 0);
      for (int64_t i = begin; i < begin + m; ++i)
        for (int32_t e : sets.at(i))
          ++count[static_cast<size_t>(e)];
      for (int64_t e = 0; e < experts; ++e) {
        actual += static_cast<double>(count[static_cast<size_t>(e)]);
        if (count[static_cast<size_t>(e)] >= t) {
          predicted += static_cast<double>(m);
          covered += static_cast<double>(count[static_cast<size_t>(e)]);
        }
      }
    }
    best = std::max(best, 2 * covered / (predicted + actual));
  }
  return best;
}

/// The lookahead cache by its definition, recounting the future at every
/// eviction.
double bruteForceLookahead(const TokenSets &sets, int64_t capacity, int64_t lookahead) {
  std::vector<int32_t> cache;
  std::map<int32_t, int64_t> lastUsed;
  int64_t clock = 0;
  double hits = 0, requests = 0;
  for (int64_t t = 0; t < sets.tokens(); ++t)
    for (int32_t item : sets.at(t)) {
      requests += 1;
      auto found = std::find(cache.begin(), cache.end(), item);
      if (found != cache.end() || static_cast<int64_t>(cache.size()) < capacity) {
        hits += 1;
        if (found == cache.end())
          cache.push_back(item);
      } else {
        auto future = [&](int32_t e) {
          int64_t n = 0;
          for (int64_t u = t; u < std::min(t + lookahead, sets.tokens()); ++u)
            for (int32_t x : sets.at(u))
              n += x == e;
          return n;
        };
        size_t out = 0;
        for (size_t i = 1; i < cache.size(); ++i) {
          const int64_t a = future(cache[i]), b = future(cache[out]);
          if (a < b || (a == b && lastUsed[cache[i]] < lastUsed[cache[out]]))
            out = i;
        }
        cache[out] = item;
      }
      lastUsed[item] = clock++;
    }
  return requests > 0 ? hits / requests : 0.0;
}

TokenSets randomSequence(std::mt19937 &random, int64_t tokens, int64_t experts, int64_t topK) {
  TokenSets sets;
  // Sticky routing (a token keeps an expert of the previous one with
  // probability 1/2), so segments and caches have something to find.
  std::vector<int32_t> previous;
  for (int64_t t = 0; t < tokens; ++t) {
    std::vector<int32_t> set;
    for (int32_t e : previous)
      if (static_cast<int64_t>(set.size()) < topK && random() % 2 == 0)
        set.push_back(e);
    while (static_cast<int64_t>(set.size()) < topK) {
      const int32_t e = static_cast<int32_t>(random() % static_cast<uint32_t>(experts));
      if (std::find(set.begin(), set.end(), e) == set.end())
        set.push_back(e);
    }
    std::sort(set.begin(), set.end());
    sets.add(set);
    previous = set;
  }
  return sets;
}

} // namespace

// Every token runs the same two of four experts: the one set predicts
// every token, at the strictest threshold.
TEST(RoutingAnalysis, ConstantRoutingIsPerfectlyConsistent) {
  TokenSets sets = sequence({{0, 1}, {0, 1}, {0, 1}, {0, 1}, {0, 1}});
  SegmentRouting best = srp(sets, 4, 4);
  EXPECT_DOUBLE_EQ(best.f1, 1.0);
  EXPECT_EQ(best.threshold, 4);
  EXPECT_DOUBLE_EQ(best.setRatio, 1.0);
  EXPECT_DOUBLE_EQ(simulateLookaheadCache(sets, 4, 2, 4).rate(), 1.0);
  EXPECT_DOUBLE_EQ(simulateLruCache(sets, 4, 2).rate(), 1.0);
}

// Worked by hand: tokens {0} {0} {1} {0} over 3 experts, m = 2. Segments
// (0,1): n0 = 2; (1,2) and (2,3): n0 = n1 = 1. Histogram h[0] = 4, h[1] =
// 4, h[2] = 1; actual A = 6. t = 2: M = 2, P = 2, F1 = 4/8; t = 1: M = 6,
// P = 10, F1 = 12/16; t = 0: P = 18, F1 = 12/24.
TEST(RoutingAnalysis, SegmentRoutingWorkedByHand) {
  TokenSets sets = sequence({{0}, {0}, {1}, {0}});
  SegmentCounts counts;
  countSegments(sets, 3, 2, counts);
  ASSERT_EQ(counts.histogram.size(), 3u);
  EXPECT_DOUBLE_EQ(counts.histogram[0], 4);
  EXPECT_DOUBLE_EQ(counts.histogram[1], 4);
  EXPECT_DOUBLE_EQ(counts.histogram[2], 1);
  SegmentRouting best = bestSegmentRouting(counts);
  EXPECT_DOUBLE_EQ(best.f1, 0.75);
  EXPECT_EQ(best.threshold, 1);
  EXPECT_DOUBLE_EQ(best.setRatio, 10.0 / 6.0);
  // A sample shorter than the segment adds nothing.
  SegmentCounts none;
  countSegments(sets, 3, 5, none);
  EXPECT_DOUBLE_EQ(bestSegmentRouting(none).f1, 0.0);
}

// {0} {1} {2} {0} with room for two: LRU evicts 0 for 2 and then misses
// 0; looking 4 tokens ahead keeps 0 (used again) and evicts 1. Looking at
// the current token alone ties 0 and 1 at zero uses: the least recently
// used (0) goes, as with LRU. The first two are filling misses, which the
// paper's code counts as hits.
TEST(RoutingAnalysis, CachesWorkedByHand) {
  TokenSets sets = sequence({{0}, {1}, {2}, {0}});
  EXPECT_DOUBLE_EQ(simulateLruCache(sets, 3, 2).rate(), 0.5);
  EXPECT_DOUBLE_EQ(simulateLookaheadCache(sets, 3, 2, 4).rate(), 0.75);
  EXPECT_DOUBLE_EQ(simulateLookaheadCache(sets, 3, 2, 1).rate(), 0.5);
  EXPECT_DOUBLE_EQ(simulateLookaheadCache(sets, 3, 3, 1).rate(), 1.0) << "room for every expert";
}

TEST(RoutingAnalysis, AgreesWithBruteForceOnRandomSequences) {
  std::mt19937 random(7);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t experts = 4 + trial % 9, topK = 1 + trial % 3, tokens = 20 + 7 * trial;
    TokenSets sets = randomSequence(random, tokens, experts, topK);
    for (int64_t m : {1, 2, 5, 16}) {
      EXPECT_NEAR(srp(sets, experts, m).f1, bruteForceSrp(sets, experts, m), 1e-12) << trial << " m=" << m;
      for (int64_t capacity : {topK, 2 * topK, experts - 1})
        EXPECT_NEAR(simulateLookaheadCache(sets, experts, capacity, m).rate(), bruteForceLookahead(sets, capacity, m),
                    1e-12)
            << trial << " m=" << m << " capacity=" << capacity;
    }
    // Foresight never loses to recency by much, and usually wins.
    EXPECT_GE(simulateLookaheadCache(sets, experts, 2 * topK, 16).rate() + 0.05,
              simulateLruCache(sets, experts, 2 * topK).rate());
  }
}

TEST(RoutingAnalysis, JensenShannonIsInBitsAndSymmetric) {
  const std::vector<double> a = {1, 0}, b = {0, 3}, c = {1, 1};
  EXPECT_DOUBLE_EQ(jensenShannon(a, a), 0.0);
  EXPECT_NEAR(jensenShannon(a, b), 1.0, 1e-12) << "disjoint supports";
  const double expected = 0.5 * std::log2(4.0 / 3.0) + 0.25 * std::log2(2.0 / 3.0) + 0.25 * std::log2(2.0);
  EXPECT_NEAR(jensenShannon(a, c), expected, 1e-12);
  EXPECT_NEAR(jensenShannon(c, a), expected, 1e-12);
  EXPECT_NEAR(jensenShannon(std::vector<double>{2, 2}, c), 0.0, 1e-12) << "counts are normalised";
}

// The recorder sees exactly what the engine routed: per domain, layer and
// expert, its activation counts equal evaluation's routing counts over the
// same windows (a separate observer of the router's choices).
TEST(RoutingAnalysis, RecordsWhatTheEngineRouted) {
  auto model = loadModel(dataDir() + "/fixtures/tiny-mixtral");
  ASSERT_TRUE(model.ok()) << model.status().message();
  auto streams = readEvalData(dataDir() + "/brown/heldout.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok()) << streams.status().message();
  auto trace = recordRouting(*model->engine, *streams, {128, 256});
  ASSERT_TRUE(trace.ok()) << trace.status().message();
  EvalOptions evalOptions{128, 0, 256};
  evalOptions.countRouting = true;
  auto evaluated = evaluate(*model->engine, *streams, evalOptions);
  ASSERT_TRUE(evaluated.ok()) << evaluated.status().message();
  ASSERT_EQ(trace->layers.size(), static_cast<size_t>(model->spec.numLayers));
  std::map<std::string, std::vector<std::vector<int64_t>>> recorded;
  for (const RoutingTrace::Sample &sample : trace->samples) {
    auto &counts = recorded[sample.domain];
    counts.resize(trace->layers.size());
    for (size_t l = 0; l < trace->layers.size(); ++l) {
      counts[l].resize(static_cast<size_t>(trace->layers[l].experts), 0);
      ASSERT_EQ(sample.layers[l].tokens(), 128);
      for (int32_t slot : sample.layers[l].slots)
        ++counts[l][static_cast<size_t>(slot)];
    }
  }
  EXPECT_EQ(recorded.size(), evaluated->routing.size());
  for (const auto &[domain, counts] : evaluated->routing)
    EXPECT_EQ(recorded[domain], counts) << domain;
  auto analysis = analyzeRouting(*trace, {});
  ASSERT_TRUE(analysis.ok()) << analysis.status().message();
  const nlohmann::json &layer = (*analysis)["layers"][0];
  EXPECT_DOUBLE_EQ(layer["activations_per_token"].get<double>(), 2.0) << "top-2, no skipping";
  EXPECT_FALSE((*analysis)["model"]["srp"].contains("256")) << "segments longer than a sample are left out";
  const double srp16 = (*analysis)["model"]["srp"]["16"]["srp"].get<double>();
  EXPECT_GT(srp16, 0.4) << "above predicting every expert (t = 0: F1 = 2(k/E)/(1 + k/E) = 0.4 for k/E = 1/4)";
  EXPECT_LT(srp16, 1.0);
}

// A model whose routing is known: with all but two of tiny-mixtral's eight
// experts masked in every layer, every token runs the same two, so every
// segment is predicted exactly, every cache of two hits, and domains do
// not differ.
TEST(RoutingAnalysis, AModelThatAlwaysRoutesTheSameWayScoresPerfectly) {
  EngineOptions masked;
  for (int64_t layer = 0; layer < 4; ++layer)
    masked.maskedExperts[layer] = {0, 1, 3, 4, 6, 7};
  auto model = loadModel(dataDir() + "/fixtures/tiny-mixtral", masked);
  ASSERT_TRUE(model.ok()) << model.status().message();
  auto streams = readEvalData(dataDir() + "/brown/heldout.jsonl", model->tokenizer.get(), model->endOfText);
  ASSERT_TRUE(streams.ok());
  auto trace = recordRouting(*model->engine, *streams, {64, 128});
  ASSERT_TRUE(trace.ok()) << trace.status().message();
  auto analysis = analyzeRouting(*trace, {{4, 16}, {1, 2}});
  ASSERT_TRUE(analysis.ok()) << analysis.status().message();
  const nlohmann::json &model_ = (*analysis)["model"];
  for (const char *m : {"4", "16"}) {
    EXPECT_DOUBLE_EQ(model_["srp"][m]["srp"].get<double>(), 1.0) << m;
    EXPECT_DOUBLE_EQ(model_["srp"][m]["set_ratio"].get<double>(), 1.0) << m;
    EXPECT_DOUBLE_EQ(model_["sch"][m]["1"].get<double>(), 1.0) << m;
  }
  EXPECT_DOUBLE_EQ(model_["lru"]["1"].get<double>(), 1.0);
  for (const nlohmann::json &layer : (*analysis)["layers"]) {
    const auto usage = layer["usage"].get<std::vector<double>>();
    EXPECT_EQ(usage[0], 0.0);
    EXPECT_GT(usage[2], 0.0);
    EXPECT_GT(usage[5], 0.0);
    EXPECT_EQ(layer["top_pairs"][0]["a"], 2);
    EXPECT_EQ(layer["top_pairs"][0]["b"], 5);
    for (const nlohmann::json &row : layer["js_divergence"])
      for (const nlohmann::json &v : row)
        EXPECT_NEAR(v.get<double>(), 0.0, 1e-12);
  }
}

TEST(RoutingAnalysis, BadOptionsAndDataAreRefused) {
  EXPECT_NE(checkRoutingAnalysisOptions({{0}, {1}}, 512).message().find("must be positive"), std::string::npos);
  EXPECT_NE(checkRoutingAnalysisOptions({{600}, {1}}, 512).message().find("exceeds the sample length"),
            std::string::npos);
  EXPECT_NE(checkRoutingAnalysisOptions({{16}, {0}}, 512).message().find("--cache-ratio"), std::string::npos);
  EXPECT_NE(checkRoutingAnalysisOptions({{16}, {NAN}}, 512).message().find("--cache-ratio"), std::string::npos);
  EXPECT_TRUE(checkRoutingAnalysisOptions({{16, 1000}, {0.5}}, 512).ok()) << "one length within the sample suffices";

  auto model = loadModel(dataDir() + "/fixtures/tiny-mixtral");
  ASSERT_TRUE(model.ok());
  std::vector<EvalStream> shortData = {{"all", {1, 2, 3}, 0, "short.u32"}};
  auto trace = recordRouting(*model->engine, shortData, {512, 0});
  ASSERT_FALSE(trace.ok());
  EXPECT_NE(trace.status().message().find("no complete window of 512 tokens"), std::string::npos);
  std::vector<EvalStream> outside = {{"all", std::vector<int32_t>(600, 1 << 30), 0, "big.u32"}};
  trace = recordRouting(*model->engine, outside, {512, 0});
  ASSERT_FALSE(trace.ok());
  EXPECT_NE(trace.status().message().find("outside the model's vocabulary"), std::string::npos);
}
