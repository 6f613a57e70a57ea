//===- ExpertSearch.cpp - EEP's evolutionary search for expert pruning ----===//
//
// Part of moec. See ExpertSearch.h for the method and where moec differs.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/ExpertSearch.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

namespace moe {

namespace {

/// Deterministic draws from a seeded generator (the same on every
/// platform, unlike the standard distributions).
class Draws {
public:
  explicit Draws(uint64_t seed) : engine(seed) {}
  /// Uniform in [0, n).
  int64_t below(int64_t n) { return static_cast<int64_t>(engine() % static_cast<uint64_t>(n)); }
  /// Uniform in [0, 1).
  double unit() { return static_cast<double>(engine() >> 11) * 0x1.0p-53; }

private:
  std::mt19937_64 engine;
};

struct SearchLayer {
  int64_t index = 0, experts = 0, keep = 0, groups = 1;
  int64_t groupOf(int64_t expert) const { return expert / (experts / groups); }
};

std::vector<SearchLayer> searchLayers(const ModelSpec &spec, const ExpertSearchOptions &options) {
  std::vector<SearchLayer> layers;
  for (int64_t l = 0; l < spec.numLayers; ++l) {
    const LayerSpec &layer = spec.layers[static_cast<size_t>(l)];
    if (layer.mlp != MlpKind::Moe)
      continue;
    if (!options.layers.empty() && std::find(options.layers.begin(), options.layers.end(), l) == options.layers.end())
      continue;
    SearchLayer s;
    s.index = l;
    s.experts = layer.numExperts;
    s.keep =
        layer.numExperts - static_cast<int64_t>(std::llround(options.ratio * static_cast<double>(layer.numExperts)));
    s.groups = std::max<int64_t>(1, spec.router.numGroups);
    layers.push_back(s);
  }
  return layers;
}

std::string candidateKey(const SearchCandidate &candidate) {
  std::string key;
  for (const auto &[layer, kept] : candidate.kept) {
    key += std::to_string(layer) + ":";
    for (int64_t e : kept)
      key += std::to_string(e) + ",";
    key += ";";
  }
  return key;
}

/// A random keep-set of `layer`: keep / groups experts from each group.
std::vector<int64_t> randomKeep(const SearchLayer &layer, Draws &draws) {
  std::vector<int64_t> kept;
  const int64_t perGroup = layer.experts / layer.groups, keepPerGroup = layer.keep / layer.groups;
  for (int64_t g = 0; g < layer.groups; ++g) {
    std::vector<int64_t> pool(static_cast<size_t>(perGroup));
    std::iota(pool.begin(), pool.end(), g * perGroup);
    for (int64_t i = 0; i < keepPerGroup; ++i) {
      const int64_t j = i + draws.below(perGroup - i);
      std::swap(pool[static_cast<size_t>(i)], pool[static_cast<size_t>(j)]);
      kept.push_back(pool[static_cast<size_t>(i)]);
    }
  }
  std::sort(kept.begin(), kept.end());
  return kept;
}

/// EEP's discrete mutation of one layer: each kept expert, with
/// probability p, becomes a random expert not kept (of its group).
void mutateLayer(const SearchLayer &layer, std::vector<int64_t> &kept, double p, Draws &draws) {
  for (size_t i = 0; i < kept.size(); ++i) {
    if (draws.unit() >= p)
      continue;
    std::vector<int64_t> dropped;
    for (int64_t e = 0; e < layer.experts; ++e)
      if (layer.groupOf(e) == layer.groupOf(kept[i]) && std::find(kept.begin(), kept.end(), e) == kept.end())
        dropped.push_back(e);
    if (!dropped.empty())
      kept[i] = dropped[static_cast<size_t>(draws.below(static_cast<int64_t>(dropped.size())))];
  }
  std::sort(kept.begin(), kept.end());
}

std::map<int64_t, std::set<int64_t>> masksOf(const std::vector<SearchLayer> &layers, const SearchCandidate &candidate) {
  std::map<int64_t, std::set<int64_t>> masks;
  for (const SearchLayer &layer : layers) {
    const std::vector<int64_t> &kept = candidate.kept.at(layer.index);
    for (int64_t e = 0; e < layer.experts; ++e)
      if (!std::binary_search(kept.begin(), kept.end(), e))
        masks[layer.index].insert(e);
  }
  return masks;
}

/// Counts, per layer, the tokens that chose each router row.
class RowCounter : public EngineObserver {
public:
  std::map<int64_t, std::vector<double>> counts;
  void onRouter(int64_t layer, int64_t tokens, std::span<const float> logits, std::span<const int32_t> chosen,
                std::span<const float>, std::span<const int32_t>) override {
    if (tokens <= 0)
      return;
    std::vector<double> &row = counts[layer];
    row.resize(logits.size() / static_cast<size_t>(tokens), 0.0);
    for (int32_t c : chosen)
      if (c >= 0 && static_cast<size_t>(c) < row.size())
        row[static_cast<size_t>(c)] += 1;
  }
};

} // namespace

Status checkExpertSearchOptions(const ModelSpec &spec, const ExpertSearchOptions &options) {
  if (!(options.ratio > 0 && options.ratio < 1))
    return Status::error("--ratio ", options.ratio, ": the fraction of experts removed must lie in (0, 1)");
  for (int64_t l : options.layers)
    if (l < 0 || l >= spec.numLayers || spec.layers[static_cast<size_t>(l)].mlp != MlpKind::Moe)
      return Status::error("--layers: layer ", l, " is not an MoE layer of this model");
  if (options.evaluations < 1 || options.initial < 1)
    return Status::error("--evaluations and --initial must be positive");
  if (options.sequenceLength < 2)
    return Status::error("--seq-len must be at least 2, got ", options.sequenceLength);
  std::vector<SearchLayer> layers = searchLayers(spec, options);
  if (layers.empty())
    return Status::error("the model has no MoE layer to search");
  for (const SearchLayer &layer : layers) {
    if (layer.keep >= layer.experts)
      return Status::error("--ratio ", options.ratio, " removes no expert of layer ", layer.index, "'s ",
                           layer.experts);
    if (layer.keep < spec.router.topK)
      return Status::error("--ratio ", options.ratio, " leaves layer ", layer.index, " ", layer.keep,
                           " experts, fewer than top-k (", spec.router.topK, ")");
    if (layer.experts % layer.groups != 0 || layer.keep % layer.groups != 0)
      return Status::error("--ratio ", options.ratio, " keeps ", layer.keep, " experts of layer ", layer.index,
                           ", not the same number in each of its ", layer.groups,
                           " router groups (dropping would then change group-limited routing)");
  }
  return Status::success();
}

Expected<ExpertSearchResult> searchExpertPruning(Engine &engine, const std::vector<EvalStream> &streams,
                                                 const ExpertSearchOptions &options) {
  const ModelSpec &spec = engine.spec();
  MOE_RETURN_IF_ERROR(checkExpertSearchOptions(spec, options));
  const std::vector<SearchLayer> layers = searchLayers(spec, options);
  EvalOptions evalOptions{options.sequenceLength, 0, options.maxTokens};
  evalOptions.progressLabel = "search";
  struct Restore {
    Engine &engine;
    ~Restore() { (void)engine.setMaskedExperts({}); }
  } restore{engine};
  auto lossOf = [&](const std::map<int64_t, std::set<int64_t>> &masks) -> Expected<double> {
    MOE_RETURN_IF_ERROR(engine.setMaskedExperts(masks));
    Expected<EvalResult> result = evaluate(engine, streams, evalOptions);
    if (!result)
      return result.status();
    if (result->overall.targets == 0)
      return Status::error("no complete window of ", options.sequenceLength, " tokens in the search data");
    return result->overall.negativeLogLikelihood / static_cast<double>(result->overall.targets);
  };

  ExpertSearchResult result;
  // The original, with the routing counts of the frequency candidate.
  RowCounter counter;
  engine.setObserver(&counter);
  Expected<double> original = lossOf({});
  engine.setObserver(nullptr);
  if (!original)
    return original.status();
  result.originalLoss = *original;

  Draws draws(options.seed);
  std::set<std::string> seen;
  std::vector<SearchCandidate> &archive = result.archive;
  int64_t evaluation = 0;
  auto add = [&](SearchCandidate candidate) -> Status {
    Expected<double> loss = lossOf(masksOf(layers, candidate));
    if (!loss)
      return loss.status();
    candidate.loss = *loss;
    const bool improved = archive.empty() || candidate.loss < archive.front().loss;
    auto at = std::upper_bound(archive.begin(), archive.end(), candidate.loss,
                               [](double loss, const SearchCandidate &c) { return loss < c.loss; });
    archive.insert(at, std::move(candidate));
    ++evaluation;
    if (options.onEvaluation)
      options.onEvaluation(evaluation, archive.front(), improved);
    return Status::success();
  };

  // The most-routed experts of each layer (within each group).
  SearchCandidate frequent;
  for (const SearchLayer &layer : layers) {
    std::vector<double> counts = counter.counts[layer.index];
    counts.resize(static_cast<size_t>(layer.experts), 0.0);
    std::vector<int64_t> order(static_cast<size_t>(layer.experts));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return counts[static_cast<size_t>(a)] > counts[static_cast<size_t>(b)];
    });
    std::vector<int64_t> perGroup(static_cast<size_t>(layer.groups), 0), kept;
    for (int64_t e : order)
      if (perGroup[static_cast<size_t>(layer.groupOf(e))] < layer.keep / layer.groups) {
        ++perGroup[static_cast<size_t>(layer.groupOf(e))];
        kept.push_back(e);
      }
    std::sort(kept.begin(), kept.end());
    frequent.kept[layer.index] = kept;
  }
  seen.insert(candidateKey(frequent));
  MOE_RETURN_IF_ERROR(add(frequent));
  result.frequencyLoss = archive.front().loss;

  // Random candidates, then one child per step.
  const int64_t tries = 64; // redraws of a duplicate before giving up
  while (evaluation < options.evaluations) {
    SearchCandidate child;
    bool fresh = false;
    for (int64_t attempt = 0; attempt < tries && !fresh; ++attempt) {
      child = {};
      if (evaluation < options.initial) {
        for (const SearchLayer &layer : layers)
          child.kept[layer.index] = randomKeep(layer, draws);
      } else {
        // The parent: uniform among those within the threshold of the best.
        const double limit = archive.front().loss * (1 + options.parentThreshold);
        int64_t within = 1;
        while (within < static_cast<int64_t>(archive.size()) && archive[static_cast<size_t>(within)].loss <= limit)
          ++within;
        child.kept = archive[static_cast<size_t>(draws.below(within))].kept;
        std::vector<bool> changes(layers.size(), false);
        bool any = false;
        while (!any)
          for (size_t l = 0; l < layers.size(); ++l) {
            changes[l] = draws.unit() < options.layerProbability;
            any = any || changes[l];
          }
        for (size_t l = 0; l < layers.size(); ++l)
          if (changes[l])
            mutateLayer(layers[l], child.kept[layers[l].index], options.swapProbability, draws);
      }
      fresh = seen.insert(candidateKey(child)).second;
    }
    if (!fresh)
      break; // the neighbourhood is exhausted (small search spaces)
    MOE_RETURN_IF_ERROR(add(child));
  }
  result.best = archive.front();
  return result;
}

nlohmann::json expertSearchRecipe(const ModelSpec &spec, const ExpertSearchResult &result,
                                  const ExpertSearchOptions &options) {
  std::string experts;
  for (const auto &[layer, kept] : result.best.kept) {
    std::string ids;
    const int64_t count = spec.layers[static_cast<size_t>(layer)].numExperts;
    for (int64_t e = 0; e < count; ++e)
      if (!std::binary_search(kept.begin(), kept.end(), e))
        ids += (ids.empty() ? "" : ",") + std::to_string(e);
    experts += (experts.empty() ? "" : ";") + std::to_string(layer) + ":" + ids;
  }
  char figures[256];
  std::snprintf(figures, sizeof figures,
                "mean loss %.6f (perplexity %.4f) on the search windows after %zu evaluations; original %.6f, "
                "most-routed experts kept %.6f",
                result.best.loss, std::exp(result.best.loss), result.archive.size(), result.originalLoss,
                result.frequencyLoss);
  return {{"description", "EEP pruning search (moec search, seed " + std::to_string(options.seed) + ", ratio " +
                              std::to_string(options.ratio) + "): " + figures},
          {"passes", nlohmann::json::array({{{"pass", "moe-drop-experts"}, {"options", {{"experts", experts}}}}})}};
}

} // namespace moe
