//===- RoutingAnalysis.cpp - Local routing consistency and expert usage ---===//
//
// Part of moec. See RoutingAnalysis.h for the measures and their source.
//
//===----------------------------------------------------------------------===//

#include "moe/Calibration/RoutingAnalysis.h"

#include "moe/Support/Progress.h"

#include <algorithm>
#include <cmath>
#include <map>

namespace moe {

//===----------------------------------------------------------------------===//
// Recording
//===----------------------------------------------------------------------===//

namespace {

/// Collects, per MoE layer of one window, the slots each token ran: the
/// engine reports each slot's routed tokens (onExpert) after masking,
/// skipping and merging, so these are the experts a runtime would load.
class RoutingRecorder : public EngineObserver {
public:
  RoutingTrace &trace;
  std::map<int64_t, size_t> position; ///< Decoder layer -> trace layer.
  std::vector<std::vector<std::vector<int32_t>>> pending;
  RoutingTrace::Sample sample;
  Status failure = Status::success();

  explicit RoutingRecorder(RoutingTrace &trace) : trace(trace) {}

  void onRouter(int64_t layer, int64_t tokens, std::span<const float> logits, std::span<const int32_t> chosen,
                std::span<const float>, std::span<const int32_t> slotOfRow) override {
    if (tokens <= 0)
      return;
    const int64_t rows = static_cast<int64_t>(logits.size()) / tokens;
    int64_t experts = rows;
    if (!slotOfRow.empty())
      experts = static_cast<int64_t>(*std::max_element(slotOfRow.begin(), slotOfRow.end())) + 1;
    const int64_t topK = static_cast<int64_t>(chosen.size()) / tokens;
    auto [it, inserted] = position.try_emplace(layer, trace.layers.size());
    if (inserted) {
      if (!trace.samples.empty())
        failure = Status::error("layer ", layer, " routed in a later window but not in the first");
      trace.layers.push_back({layer, experts, topK});
      pending.emplace_back();
    }
    pending[it->second].assign(static_cast<size_t>(tokens), {});
  }

  void onExpert(int64_t layer, int64_t expert, std::span<const int32_t> tokenIndices, std::span<const float>,
                std::span<const float>, std::span<const float>) override {
    auto it = position.find(layer);
    if (it == position.end())
      return;
    std::vector<std::vector<int32_t>> &tokens = pending[it->second];
    for (int32_t t : tokenIndices)
      if (t >= 0 && static_cast<size_t>(t) < tokens.size())
        tokens[static_cast<size_t>(t)].push_back(static_cast<int32_t>(expert));
  }

  void onMoeBlock(int64_t layer, int64_t, std::span<const float>, std::span<const float>) override {
    auto it = position.find(layer);
    if (it == position.end())
      return;
    sample.layers.resize(trace.layers.size());
    TokenSets &sets = sample.layers[it->second];
    for (std::vector<int32_t> &slots : pending[it->second]) {
      std::sort(slots.begin(), slots.end());
      sets.add(slots);
    }
  }
};

} // namespace

Expected<RoutingTrace> recordRouting(Engine &engine, const std::vector<EvalStream> &streams,
                                     const RoutingRecordOptions &options) {
  const int64_t L = options.sequenceLength;
  if (L < 1)
    return Status::error("--seq-len must be positive, got ", L);
  struct Window {
    const EvalStream *stream;
    int64_t begin;
  };
  std::vector<Window> windows;
  for (const EvalStream &stream : streams) {
    int64_t count = std::max<int64_t>(0, (static_cast<int64_t>(stream.ids.size()) - 1) / L);
    if (options.maxTokens > 0)
      count = std::min(count, (options.maxTokens + L - 1) / L);
    for (int64_t w = 0; w < count; ++w)
      windows.push_back({&stream, w * L});
  }
  if (windows.empty())
    return Status::error("no complete window of ", L, " tokens in the data (--seq-len ", L, ")");
  const int64_t V = engine.spec().vocabSize;
  for (const EvalStream &stream : streams)
    for (int32_t id : stream.ids)
      if (id < 0 || id >= V)
        return Status::error(stream.source.empty() ? std::string() : stream.source + ": ", "domain '", stream.domain,
                             "': token id ", id, " is outside the model's vocabulary of ", V);

  RoutingTrace trace;
  trace.sequenceLength = L;
  RoutingRecorder recorder(trace);
  engine.setObserver(&recorder);
  struct Detach {
    Engine &engine;
    ~Detach() { engine.setObserver(nullptr); }
  } detach{engine};
  Progress progress("routing", static_cast<int64_t>(windows.size()), "windows");
  std::vector<float> logits;
  for (const Window &window : windows) {
    recorder.sample = {window.stream->domain, {}};
    KvCache cache = engine.newCache();
    MOE_RETURN_IF_ERROR(
        engine.forward(std::span(window.stream->ids).subspan(static_cast<size_t>(window.begin), static_cast<size_t>(L)),
                       cache, logits, /*lastOnly=*/true));
    MOE_RETURN_IF_ERROR(recorder.failure);
    recorder.sample.layers.resize(trace.layers.size());
    trace.samples.push_back(std::move(recorder.sample));
    progress.advance();
  }
  if (trace.layers.empty())
    return Status::error("the model has no routed MoE layer; there is no routing to analyze");
  return trace;
}

//===----------------------------------------------------------------------===//
// SRP
//===----------------------------------------------------------------------===//

void SegmentCounts::add(const SegmentCounts &other) {
  if (histogram.size() < other.histogram.size())
    histogram.resize(other.histogram.size(), 0.0);
  for (size_t n = 0; n < other.histogram.size(); ++n)
    histogram[n] += other.histogram[n];
}

void countSegments(const TokenSets &sets, int64_t experts, int64_t m, SegmentCounts &counts) {
  counts.segmentLength = m;
  counts.histogram.resize(static_cast<size_t>(m + 1), 0.0);
  const int64_t T = sets.tokens();
  if (m < 1 || T < m || experts < 1)
    return;
  // The segment's count per slot and, kept in step, how many slots have
  // each count; sliding by one token changes only the slots of the token
  // that enters and the one that leaves.
  std::vector<int64_t> count(static_cast<size_t>(experts), 0), slotsWith(static_cast<size_t>(m + 1), 0);
  slotsWith[0] = experts;
  auto move = [&](int32_t slot, int64_t delta) {
    if (slot < 0 || slot >= experts)
      return;
    int64_t &c = count[static_cast<size_t>(slot)];
    --slotsWith[static_cast<size_t>(c)];
    c += delta;
    ++slotsWith[static_cast<size_t>(c)];
  };
  for (int64_t t = 0; t < T; ++t) {
    for (int32_t slot : sets.at(t))
      move(slot, +1);
    if (t >= m)
      for (int32_t slot : sets.at(t - m))
        move(slot, -1);
    if (t >= m - 1)
      for (int64_t n = 0; n <= m; ++n)
        counts.histogram[static_cast<size_t>(n)] += static_cast<double>(slotsWith[static_cast<size_t>(n)]);
  }
}

SegmentRouting bestSegmentRouting(const SegmentCounts &counts) {
  // Threshold t predicts the slots with n >= t for every token of the
  // segment: covered M(t) = sum_{n >= t} n h[n] of the actual
  // A = sum_n n h[n], predicted P(t) = m sum_{n >= t} h[n];
  // F1 = 2 M / (P + A).
  SegmentRouting best;
  const int64_t m = counts.segmentLength;
  double actual = 0;
  for (size_t n = 0; n < counts.histogram.size(); ++n)
    actual += static_cast<double>(n) * counts.histogram[n];
  if (actual <= 0)
    return best;
  double covered = 0, pairs = 0;
  for (int64_t t = static_cast<int64_t>(counts.histogram.size()) - 1; t >= 0; --t) {
    covered += static_cast<double>(t) * counts.histogram[static_cast<size_t>(t)];
    pairs += counts.histogram[static_cast<size_t>(t)];
    const double predicted = static_cast<double>(m) * pairs;
    const double f1 = 2 * covered / (predicted + actual);
    if (f1 > best.f1 || (f1 == best.f1 && t > best.threshold)) {
      best.f1 = f1;
      best.threshold = t;
      best.setRatio = predicted / actual;
    }
  }
  return best;
}

//===----------------------------------------------------------------------===//
// Caches
//===----------------------------------------------------------------------===//

namespace {

/// One demand-filled cache; `victim` picks the slot to evict among the
/// cached items. Misses while the cache is not full count as hits (the
/// released code's convention: the cache starts full).
template <typename Victim>
CacheCounts simulateCache(const TokenSets &sets, int64_t items, int64_t capacity, Victim &victim,
                          std::vector<int64_t> &lastUsed) {
  CacheCounts result;
  if (capacity < 1)
    return result;
  std::vector<char> cached(static_cast<size_t>(items), 0);
  std::vector<int32_t> resident;
  lastUsed.assign(static_cast<size_t>(items), -1);
  int64_t clock = 0;
  for (int64_t t = 0; t < sets.tokens(); ++t) {
    victim.advance(t);
    for (int32_t item : sets.at(t)) {
      if (item < 0 || item >= items)
        continue;
      result.requests += 1;
      if (cached[static_cast<size_t>(item)]) {
        result.hits += 1;
      } else if (static_cast<int64_t>(resident.size()) < capacity) {
        result.hits += 1;
        cached[static_cast<size_t>(item)] = 1;
        resident.push_back(item);
      } else {
        size_t out = 0;
        for (size_t i = 1; i < resident.size(); ++i)
          if (victim.before(resident[i], resident[out]))
            out = i;
        cached[static_cast<size_t>(resident[out])] = 0;
        cached[static_cast<size_t>(item)] = 1;
        resident[out] = item;
      }
      lastUsed[static_cast<size_t>(item)] = clock++;
    }
  }
  return result;
}

} // namespace

CacheCounts simulateLookaheadCache(const TokenSets &sets, int64_t items, int64_t capacity, int64_t lookahead) {
  // future[i]: requests of item i in tokens [t, t + lookahead).
  struct Lookahead {
    const TokenSets &sets;
    int64_t lookahead, items;
    std::vector<int64_t> future;
    const std::vector<int64_t> *lastUsed = nullptr;
    int64_t next = 0; // tokens [0, next) have been added
    void advance(int64_t t) {
      if (t > 0)
        for (int32_t item : sets.at(t - 1))
          if (item >= 0 && item < items)
            --future[static_cast<size_t>(item)];
      for (; next < std::min(t + lookahead, sets.tokens()); ++next)
        for (int32_t item : sets.at(next))
          if (item >= 0 && item < items)
            ++future[static_cast<size_t>(item)];
    }
    bool before(int32_t a, int32_t b) const {
      const int64_t fa = future[static_cast<size_t>(a)], fb = future[static_cast<size_t>(b)];
      return fa != fb ? fa < fb : (*lastUsed)[static_cast<size_t>(a)] < (*lastUsed)[static_cast<size_t>(b)];
    }
  };
  std::vector<int64_t> lastUsed;
  Lookahead policy{sets, std::max<int64_t>(lookahead, 1), items, std::vector<int64_t>(static_cast<size_t>(items), 0)};
  policy.lastUsed = &lastUsed;
  return simulateCache(sets, items, capacity, policy, lastUsed);
}

CacheCounts simulateLruCache(const TokenSets &sets, int64_t items, int64_t capacity) {
  struct Lru {
    const std::vector<int64_t> *lastUsed = nullptr;
    void advance(int64_t) {}
    bool before(int32_t a, int32_t b) const {
      return (*lastUsed)[static_cast<size_t>(a)] < (*lastUsed)[static_cast<size_t>(b)];
    }
  };
  std::vector<int64_t> lastUsed;
  Lru policy{&lastUsed};
  return simulateCache(sets, items, capacity, policy, lastUsed);
}

//===----------------------------------------------------------------------===//
// Divergence
//===----------------------------------------------------------------------===//

double jensenShannon(std::span<const double> p, std::span<const double> q) {
  double sp = 0, sq = 0;
  const size_t n = std::max(p.size(), q.size());
  for (double v : p)
    sp += v;
  for (double v : q)
    sq += v;
  if (sp <= 0 || sq <= 0)
    return 0.0;
  double divergence = 0;
  for (size_t i = 0; i < n; ++i) {
    const double a = i < p.size() ? p[i] / sp : 0.0, b = i < q.size() ? q[i] / sq : 0.0;
    const double mid = 0.5 * (a + b);
    if (a > 0)
      divergence += 0.5 * a * std::log2(a / mid);
    if (b > 0)
      divergence += 0.5 * b * std::log2(b / mid);
  }
  return std::clamp(divergence, 0.0, 1.0);
}

//===----------------------------------------------------------------------===//
// The analysis
//===----------------------------------------------------------------------===//

namespace {

using nlohmann::json;

std::string key(double value) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%g", value);
  return buffer;
}

int64_t cacheSize(double ratio, int64_t topK) {
  return std::max<int64_t>(1, static_cast<int64_t>(std::llround(ratio * static_cast<double>(topK))));
}

/// SCH (per segment length and cache ratio) and LRU (per ratio) summed
/// over samples, for one layer or for the joined cache of all layers.
struct CacheTally {
  const std::vector<int64_t> &lengths;
  const std::vector<double> &ratios;
  int64_t topK = 0; ///< The cache holds ratio x topK items.
  std::map<std::pair<int64_t, double>, CacheCounts> lookahead;
  std::map<double, CacheCounts> recency;

  void simulate(const TokenSets &sets, int64_t items) {
    for (double ratio : ratios) {
      const int64_t size = cacheSize(ratio, topK);
      CacheCounts r = simulateLruCache(sets, items, size);
      recency[ratio].hits += r.hits;
      recency[ratio].requests += r.requests;
      for (int64_t m : lengths) {
        CacheCounts c = simulateLookaheadCache(sets, items, size, m);
        lookahead[{m, ratio}].hits += c.hits;
        lookahead[{m, ratio}].requests += c.requests;
      }
    }
  }
  /// Writes "sch", "lru" and "cache_experts" into `entry`.
  void write(nlohmann::json &entry) {
    nlohmann::json sch = nlohmann::json::object(), lru = nlohmann::json::object(), sizes = nlohmann::json::object();
    for (int64_t m : lengths) {
      nlohmann::json rates = nlohmann::json::object();
      for (double ratio : ratios)
        rates[key(ratio)] = lookahead[{m, ratio}].rate();
      sch[std::to_string(m)] = rates;
    }
    for (double ratio : ratios) {
      lru[key(ratio)] = recency[ratio].rate();
      sizes[key(ratio)] = cacheSize(ratio, topK);
    }
    entry["sch"] = sch;
    entry["lru"] = lru;
    entry["cache_experts"] = sizes;
  }
};

json segmentJson(const SegmentRouting &best) {
  return {{"srp", best.f1}, {"threshold", best.threshold}, {"set_ratio", best.setRatio}};
}

/// Per layer, the symmetric JS matrix between domains (by `names`).
json divergenceMatrix(const std::vector<std::string> &names, const std::map<std::string, std::vector<double>> &usage) {
  json matrix = json::array();
  for (const std::string &a : names) {
    json row = json::array();
    for (const std::string &b : names)
      row.push_back(jensenShannon(usage.at(a), usage.at(b)));
    matrix.push_back(row);
  }
  return matrix;
}

} // namespace

Status checkRoutingAnalysisOptions(const RoutingAnalysisOptions &options, int64_t sequenceLength) {
  bool within = false;
  for (int64_t m : options.segmentLengths) {
    if (m < 1)
      return Status::error("--segment ", m, ": segment lengths must be positive");
    within = within || m <= sequenceLength;
  }
  if (!within)
    return Status::error("--segment: every segment length exceeds the sample length (--seq-len ", sequenceLength, ")");
  if (options.cacheRatios.empty())
    return Status::error("--cache-ratio: give at least one cache size");
  for (double ratio : options.cacheRatios)
    if (!(ratio > 0) || !std::isfinite(ratio) || ratio > 1e6)
      return Status::error("--cache-ratio ", ratio, ": cache sizes must be positive multiples of top-k (at most 1e6)");
  return Status::success();
}

// The JSON: {"samples", "tokens", "sequence_length", "segment_lengths",
// "cache_ratios", "domains": {"names", "tokens", "js_divergence" (mean over
// layers)}, "model": {"activation_ratio", "srp": {m: {"srp", "threshold",
// "set_ratio"}}, "sch": {m: {ratio: rate}}, "lru": {ratio: rate},
// "cache_experts": {ratio: size}}, "layers": [{"index", "experts",
// "top_k", "activations_per_token", "activation_ratio", "srp", "sch",
// "lru", "cache_experts", "usage" (activations per slot), "domains":
// {name: usage}, "js_divergence" (matrix by domains.names), "coactivation"
// (tokens per slot pair, slots <= 64), "top_pairs": [{"a", "b", "tokens",
// "lift"}]}]}. The model-level SCH and LRU join every layer into one cache
// of ratio x (sum of top-k) slots, as the paper's model-level figure does;
// the model-level SRP pools every layer's segments.
Expected<json> analyzeRouting(const RoutingTrace &trace, const RoutingAnalysisOptions &options) {
  if (trace.samples.empty() || trace.layers.empty())
    return Status::error("no routing was recorded");
  MOE_RETURN_IF_ERROR(checkRoutingAnalysisOptions(options, trace.sequenceLength));
  std::vector<int64_t> lengths;
  for (int64_t m : options.segmentLengths)
    if (m <= trace.sequenceLength)
      lengths.push_back(m);

  std::vector<std::string> names;
  std::map<std::string, int64_t> domainTokens;
  for (const RoutingTrace::Sample &sample : trace.samples) {
    if (!domainTokens.count(sample.domain))
      names.push_back(sample.domain);
    domainTokens[sample.domain] += trace.sequenceLength;
  }
  std::sort(names.begin(), names.end());

  const size_t layerCount = trace.layers.size();
  json layers = json::array();
  std::map<int64_t, SegmentCounts> pooled;
  std::vector<std::vector<double>> meanDivergence(names.size(), std::vector<double>(names.size(), 0.0));
  double activationRatio = 0;
  Progress progress("analysis", static_cast<int64_t>(layerCount), "layers");
  for (size_t l = 0; l < layerCount; ++l) {
    const RoutingTrace::Layer &layer = trace.layers[l];
    const int64_t E = layer.experts;
    std::vector<double> usage(static_cast<size_t>(E), 0.0);
    std::map<std::string, std::vector<double>> domainUsage;
    for (const std::string &name : names)
      domainUsage[name].assign(static_cast<size_t>(E), 0.0);
    std::vector<double> pairs(static_cast<size_t>(E * E), 0.0);
    double activations = 0, tokens = 0;
    json srp = json::object();
    std::map<int64_t, SegmentCounts> segments;
    CacheTally caches{lengths, options.cacheRatios, layer.topK};
    for (const RoutingTrace::Sample &sample : trace.samples) {
      const TokenSets &sets = sample.layers[l];
      std::vector<double> &mine = domainUsage[sample.domain];
      for (int64_t t = 0; t < sets.tokens(); ++t) {
        std::span<const int32_t> set = sets.at(t);
        tokens += 1;
        activations += static_cast<double>(set.size());
        for (size_t i = 0; i < set.size(); ++i) {
          usage[static_cast<size_t>(set[i])] += 1;
          mine[static_cast<size_t>(set[i])] += 1;
          for (size_t j = i + 1; j < set.size(); ++j)
            pairs[static_cast<size_t>(set[i] * E + set[j])] += 1;
        }
      }
      for (int64_t m : lengths)
        countSegments(sets, E, m, segments[m]);
      caches.simulate(sets, E);
    }
    for (int64_t m : lengths) {
      srp[std::to_string(m)] = segmentJson(bestSegmentRouting(segments[m]));
      pooled[m].segmentLength = m;
      pooled[m].add(segments[m]);
    }
    json domains = json::object();
    for (const std::string &name : names)
      domains[name] = domainUsage[name];
    json divergence = divergenceMatrix(names, domainUsage);
    for (size_t a = 0; a < names.size(); ++a)
      for (size_t b = 0; b < names.size(); ++b)
        meanDivergence[a][b] += divergence[a][b].get<double>() / static_cast<double>(layerCount);
    // The most frequent pairs, with their lift over independence.
    std::vector<std::pair<double, std::pair<int64_t, int64_t>>> ranked;
    for (int64_t a = 0; a < E; ++a)
      for (int64_t b = a + 1; b < E; ++b)
        if (pairs[static_cast<size_t>(a * E + b)] > 0)
          ranked.push_back({pairs[static_cast<size_t>(a * E + b)], {a, b}});
    std::sort(ranked.begin(), ranked.end(), [](const auto &x, const auto &y) {
      return x.first != y.first ? x.first > y.first : x.second < y.second;
    });
    json top = json::array();
    for (size_t i = 0; i < std::min<size_t>(ranked.size(), 8); ++i) {
      auto [a, b] = ranked[i].second;
      const double pa = usage[static_cast<size_t>(a)] / tokens, pb = usage[static_cast<size_t>(b)] / tokens;
      top.push_back({{"a", a}, {"b", b}, {"tokens", ranked[i].first}, {"lift", ranked[i].first / tokens / (pa * pb)}});
    }
    const double perToken = tokens > 0 ? activations / tokens : 0.0;
    activationRatio += perToken / static_cast<double>(E) / static_cast<double>(layerCount);
    json entry = {{"index", layer.index},
                  {"experts", E},
                  {"top_k", layer.topK},
                  {"activations_per_token", perToken},
                  {"activation_ratio", perToken / static_cast<double>(E)},
                  {"srp", srp},
                  {"usage", usage},
                  {"domains", domains},
                  {"js_divergence", divergence},
                  {"top_pairs", top}};
    caches.write(entry);
    if (E <= 64) {
      json matrix = json::array();
      for (int64_t a = 0; a < E; ++a) {
        json row = json::array();
        for (int64_t b = 0; b < E; ++b)
          row.push_back(a == b ? usage[static_cast<size_t>(a)]
                               : pairs[static_cast<size_t>(std::min(a, b) * E + std::max(a, b))]);
        matrix.push_back(row);
      }
      entry["coactivation"] = matrix;
    }
    layers.push_back(entry);
    progress.advance();
  }

  // Model level: SRP pooled over layers; one cache over every layer's
  // slots (item = layer offset + slot), sized ratio x the summed top-k.
  std::vector<int64_t> offset(layerCount + 1, 0);
  int64_t summedTopK = 0;
  for (size_t l = 0; l < layerCount; ++l) {
    offset[l + 1] = offset[l] + trace.layers[l].experts;
    summedTopK += trace.layers[l].topK;
  }
  json model = {{"activation_ratio", activationRatio}};
  json srp = json::object();
  for (int64_t m : lengths)
    srp[std::to_string(m)] = segmentJson(bestSegmentRouting(pooled[m]));
  model["srp"] = srp;
  CacheTally caches{lengths, options.cacheRatios, summedTopK};
  for (const RoutingTrace::Sample &sample : trace.samples) {
    TokenSets joined;
    const int64_t T = sample.layers.empty() ? 0 : sample.layers[0].tokens();
    std::vector<int32_t> items;
    for (int64_t t = 0; t < T; ++t) {
      items.clear();
      for (size_t l = 0; l < layerCount; ++l)
        for (int32_t slot : sample.layers[l].at(t))
          items.push_back(static_cast<int32_t>(offset[l] + slot));
      joined.add(items);
    }
    caches.simulate(joined, offset[layerCount]);
  }
  caches.write(model);

  json tokensByDomain = json::object();
  for (const auto &[name, count] : domainTokens)
    tokensByDomain[name] = count;
  return json{{"samples", trace.samples.size()},
              {"tokens", static_cast<int64_t>(trace.samples.size()) * trace.sequenceLength},
              {"sequence_length", trace.sequenceLength},
              {"segment_lengths", lengths},
              {"cache_ratios", options.cacheRatios},
              {"domains", {{"names", names}, {"tokens", tokensByDomain}, {"js_divergence", meanDivergence}}},
              {"model", model},
              {"layers", layers}};
}

} // namespace moe
