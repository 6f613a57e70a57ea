//===- RoutingAnalysis.h - Local routing consistency and expert usage -*- C++ -*-===//
//
// Part of moec. What `moec analyze` measures: which expert slots each token
// ran, layer by layer (recorded by the engine's own forward pass), and from
// that the two measures of local routing consistency of Liang et al. 2025
// ("Not all models suit expert offloading"), as their released code
// (ljcleo/moe-lrc) computes them:
//
// - SRP, segment routing best performance: over every segment of m
//   consecutive tokens of a sample (stride 1), the experts that at least t
//   of its tokens activate are predicted active for all m tokens; SRP is the
//   best F1 over t of those predictions against the real activations,
//   pooled over segments (and layers) before the maximum is taken.
// - SCH, segment cache best hit rate: a cache of c experts per layer,
//   filled on demand, that on a miss evicts the expert used least often in
//   the next m tokens (the current one included; ties: least recently
//   used). Compulsory misses are not counted (the cache starts full of the
//   first experts the sample uses), as in the released code.
//
// Beside them: an LRU cache of the same size (what a plain offloading
// runtime gets), expert usage and co-activation, and per-domain usage with
// the Jensen-Shannon divergence between domains.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_CALIBRATION_ROUTINGANALYSIS_H
#define MOE_CALIBRATION_ROUTINGANALYSIS_H

#include "moe/Runtime/Engine.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Support/Status.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace moe {

/// One sample's activations at one layer: per token, the expert slots that
/// ran (sorted), as offsets into `slots` (CSR; offsets has tokens + 1).
struct TokenSets {
  std::vector<int64_t> offsets = {0};
  std::vector<int32_t> slots;
  int64_t tokens() const { return static_cast<int64_t>(offsets.size()) - 1; }
  std::span<const int32_t> at(int64_t token) const {
    return std::span(slots).subspan(
        static_cast<size_t>(offsets[static_cast<size_t>(token)]),
        static_cast<size_t>(offsets[static_cast<size_t>(token) + 1] - offsets[static_cast<size_t>(token)]));
  }
  void add(std::span<const int32_t> set) {
    slots.insert(slots.end(), set.begin(), set.end());
    offsets.push_back(static_cast<int64_t>(slots.size()));
  }
};

/// What the engine routed: per MoE layer its slot count and top-k, per
/// sample (window) its domain and per layer its token sets.
struct RoutingTrace {
  struct Layer {
    int64_t index = 0;   ///< Decoder layer index.
    int64_t experts = 0; ///< Expert slots (router rows after the remap).
    int64_t topK = 0;    ///< Choices per token.
  };
  struct Sample {
    std::string domain;
    std::vector<TokenSets> layers; ///< Parallel to RoutingTrace::layers.
  };
  std::vector<Layer> layers;
  std::vector<Sample> samples;
  int64_t sequenceLength = 0;
};

struct RoutingRecordOptions {
  int64_t sequenceLength = 512; ///< Sample length (the paper's 512).
  int64_t maxTokens = 0;        ///< Per domain; 0: all complete windows.
};

/// Runs every complete window of `streams` through `engine` (floor((N-1)/L)
/// per stream, as eval takes them) and records which slots each token ran
/// at each MoE layer (after masking, dynamic skipping and merged slots).
Expected<RoutingTrace> recordRouting(Engine &engine, const std::vector<EvalStream> &streams,
                                     const RoutingRecordOptions &options);

/// SRP's pooled counts over segments of length m (stride 1, inside
/// samples): histogram[n] is the number of (segment, expert slot) pairs in
/// which exactly n of the segment's m tokens activate the slot.
struct SegmentCounts {
  int64_t segmentLength = 0;
  std::vector<double> histogram; ///< m + 1 entries.
  void add(const SegmentCounts &other);
};
/// Adds `sets`' segments of length m over `experts` slots to `counts`
/// (nothing when the sample is shorter than m).
void countSegments(const TokenSets &sets, int64_t experts, int64_t m, SegmentCounts &counts);

struct SegmentRouting {
  double f1 = 0;         ///< SRP: the best F1 over thresholds.
  int64_t threshold = 0; ///< The threshold that gives it.
  /// Predicted slots per activation at that threshold (mean set size over
  /// activations per token; the paper's rho-hat).
  double setRatio = 0;
};
SegmentRouting bestSegmentRouting(const SegmentCounts &counts);

/// Hits and requests of a cache of `capacity` items over a sequence of
/// request sets (one per token; items are any ids below `items`).
struct CacheCounts {
  double hits = 0, requests = 0;
  double rate() const { return requests > 0 ? hits / requests : 0.0; }
};
/// SCH's cache: on a miss with the cache full, evicts the cached item
/// requested least often in tokens [t, t + lookahead) (ties: least
/// recently used); misses while it is not full are not counted.
CacheCounts simulateLookaheadCache(const TokenSets &sets, int64_t items, int64_t capacity, int64_t lookahead);
/// The same cache with least-recently-used eviction (what an offloading
/// runtime without foresight gets); misses while not full not counted.
CacheCounts simulateLruCache(const TokenSets &sets, int64_t items, int64_t capacity);

/// Jensen-Shannon divergence (base 2, in [0, 1]) of two distributions
/// given as non-negative counts (normalised here).
double jensenShannon(std::span<const double> p, std::span<const double> q);

struct RoutingAnalysisOptions {
  std::vector<int64_t> segmentLengths = {4, 16, 64, 256};
  std::vector<double> cacheRatios = {1, 2}; ///< Cache size in units of top-k per layer.
};

/// Fails on a segment length below 1, none within `sequenceLength`, or a
/// cache ratio that is not positive and finite.
Status checkRoutingAnalysisOptions(const RoutingAnalysisOptions &options, int64_t sequenceLength);

/// The analysis of a trace as JSON (RoutingAnalysis.cpp documents the
/// fields; `moec analyze` writes it into the report).
Expected<nlohmann::json> analyzeRouting(const RoutingTrace &trace, const RoutingAnalysisOptions &options);

} // namespace moe

#endif // MOE_CALIBRATION_ROUTINGANALYSIS_H
