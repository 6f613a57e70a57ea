//===- ExpertSearch.cpp - EEP's evolutionary search for expert pruning ----===//
//
// Part of moec. See ExpertSearch.h for the method and where moec differs.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/ExpertSearch.h"
#include "moe/Frontend/DType.h"
#include "moe/Transforms/ExpertMix.h"

#include <algorithm>
#include <cmath>
#include <functional>
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
  /// Standard normal (Box-Muller).
  double gauss() {
    const double u = 1.0 - unit(), v = unit();
    return std::sqrt(-2.0 * std::log(u)) * std::cos(2.0 * M_PI * v);
  }

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

/// Which of `count` layers a child changes: each with probability `p`,
/// drawn again until at least one does (EEP's group_change).
std::vector<bool> layersThatChange(size_t count, double p, Draws &draws) {
  std::vector<bool> changes(count, false);
  bool any = false;
  while (!any)
    for (size_t l = 0; l < count; ++l) {
      changes[l] = draws.unit() < p;
      any = any || changes[l];
    }
  return changes;
}

/// How many of a sorted archive's first candidates parents are drawn
/// from: those within `threshold` (a fraction) of the best loss, at least
/// `least` (and at most all).
int64_t parentsWithin(const std::vector<SearchCandidate> &archive, double threshold, int64_t least) {
  const double limit = archive.front().loss * (1 + threshold);
  int64_t within = 1;
  while (within < static_cast<int64_t>(archive.size()) && archive[static_cast<size_t>(within)].loss <= limit)
    ++within;
  return std::min<int64_t>(std::max(within, least), static_cast<int64_t>(archive.size()));
}

/// Inserts `candidate` into the loss-sorted `archive` (after equal
/// losses); whether it is the new best.
bool insertSorted(std::vector<SearchCandidate> &archive, SearchCandidate candidate) {
  const bool improved = archive.empty() || candidate.loss < archive.front().loss;
  auto at = std::upper_bound(archive.begin(), archive.end(), candidate.loss,
                             [](double loss, const SearchCandidate &c) { return loss < c.loss; });
  archive.insert(at, std::move(candidate));
  return improved;
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

/// The mix of `candidate` as the pass option spells it: per layer, each
/// kept expert whose row is not one-hot on itself, with its non-zero
/// coefficients in expert order (an all-zero row: its own, times zero).
ExpertMixes mixesOf(const SearchCandidate &candidate) {
  ExpertMixes mixes;
  for (const auto &[layer, rows] : candidate.mix) {
    const std::vector<int64_t> &kept = candidate.kept.at(layer);
    for (size_t j = 0; j < rows.size(); ++j) {
      std::vector<ExpertMixTerm> terms;
      for (size_t i = 0; i < rows[j].size(); ++i)
        if (rows[j][i] != 0.0f)
          terms.push_back({static_cast<int64_t>(i), rows[j][i]});
      if (terms.empty())
        terms.push_back({kept[j], 0.0f});
      if (terms.size() == 1 && terms[0].source == kept[j] && terms[0].coefficient == 1.0f)
        continue;
      mixes[layer][kept[j]] = std::move(terms);
    }
  }
  return mixes;
}

/// A searched layer's experts must be float matrices of one width, whole,
/// for the merge stage to mix them.
Status checkMergeable(Engine &engine, const std::vector<SearchLayer> &layers) {
  if (engine.device() || engine.expertCache())
    return Status::error("--merge-evaluations: the merge stage runs on the host with every expert resident (no "
                         "device, no expert cache)");
  for (const SearchLayer &layer : layers) {
    Expected<std::shared_ptr<const LayerWeights>> weights = engine.layerWeights(layer.index);
    if (!weights)
      return weights.status();
    const std::vector<MlpWeights> &experts = (*weights)->experts;
    if (!(*weights)->routing.remap.empty() || static_cast<int64_t>(experts.size()) != layer.experts)
      return Status::error("--merge-evaluations: layer ", layer.index,
                           " has merged experts (router rows sharing a slot); the merge stage mixes a layer whose "
                           "every router row is its own expert");
    for (size_t e = 0; e < experts.size(); ++e) {
      const MlpWeights &expert = experts[e];
      for (const Matrix *m : {&expert.gate, &expert.up, &expert.down})
        if (m->isQuantized() || m->empty())
          return Status::error("--merge-evaluations: expert ", e, " of layer ", layer.index,
                               " is not a float matrix (the merge stage mixes float experts; search before "
                               "quantizing)");
      if (!expert.moreParts.empty() || expert.gate.rows != experts.front().gate.rows)
        return Status::error("--merge-evaluations: the experts of layer ", layer.index,
                             " differ in width (the merge stage mixes experts of one width; search before "
                             "moe-prune-atoms)");
    }
  }
  return Status::success();
}

/// The mix of `sources` as mixMatrix makes it, row by row, stored as the
/// target `like` stores its matrix (bf16 or f32), so the candidate holds
/// the values moe-mix-experts writes.
Matrix mixedMatrix(std::span<const ExpertMixTerm> terms, std::span<const Matrix *const> sources, const Matrix &like) {
  Matrix out;
  out.rows = like.rows;
  out.cols = like.cols;
  const size_t cols = static_cast<size_t>(like.cols);
  std::vector<std::vector<float>> rows(sources.size(), std::vector<float>(cols));
  std::vector<std::span<const float>> spans(rows.begin(), rows.end());
  std::vector<float> mixed(cols);
  if (like.isBf16())
    out.bf16.resize(static_cast<size_t>(like.rows) * cols);
  else
    out.data.resize(static_cast<size_t>(like.rows) * cols);
  for (int64_t r = 0; r < like.rows; ++r) {
    for (size_t s = 0; s < sources.size(); ++s)
      sources[s]->copyRow(r, rows[s].data());
    mixMatrix(terms, spans, mixed);
    if (like.isBf16())
      for (size_t c = 0; c < cols; ++c)
        out.bf16[static_cast<size_t>(r) * cols + c] = floatToBfloat16(mixed[c]);
    else
      std::copy(mixed.begin(), mixed.end(), out.data.begin() + static_cast<ptrdiff_t>(static_cast<size_t>(r) * cols));
  }
  return out;
}

/// The engine's replaced experts for `candidate`'s mix.
Expected<std::map<int64_t, std::map<int64_t, std::shared_ptr<const MlpWeights>>>>
replacedExperts(Engine &engine, const SearchCandidate &candidate) {
  std::map<int64_t, std::map<int64_t, std::shared_ptr<const MlpWeights>>> replaced;
  for (const auto &[layer, targets] : mixesOf(candidate)) {
    Expected<std::shared_ptr<const LayerWeights>> weights = engine.layerWeights(layer);
    if (!weights)
      return weights.status();
    const std::vector<MlpWeights> &experts = (*weights)->experts;
    for (const auto &[target, terms] : targets) {
      auto mlp = std::make_shared<MlpWeights>();
      for (auto member : {&MlpWeights::gate, &MlpWeights::up, &MlpWeights::down}) {
        std::vector<const Matrix *> sources;
        for (const ExpertMixTerm &term : terms)
          sources.push_back(&(experts[static_cast<size_t>(term.source)].*member));
        (*mlp).*member = mixedMatrix(terms, sources, experts[static_cast<size_t>(target)].*member);
      }
      replaced[layer][target] = std::move(mlp);
    }
  }
  return replaced;
}

} // namespace

Status checkExpertSearchOptions(const ModelSpec &spec, const ExpertSearchOptions &options) {
  if (!(options.ratio > 0 && options.ratio < 1))
    return Status::error("--ratio ", options.ratio, ": the fraction of experts removed must lie in (0, 1)");
  for (int64_t l : options.layers)
    if (l < 0 || l >= spec.numLayers || spec.layers[static_cast<size_t>(l)].mlp != MlpKind::Moe)
      return Status::error("--layers: layer ", l, " is not an MoE layer of this model");
  if (options.evaluations < 1 || options.initial < 1)
    return Status::error("--evaluations and --initial must be positive");
  if (options.mergeEvaluations < 0)
    return Status::error("--merge-evaluations must not be negative, got ", options.mergeEvaluations);
  if (!(options.mergeScale > 0 && std::isfinite(options.mergeScale)))
    return Status::error("--merge-scale must be a positive number, got ", options.mergeScale);
  if (!(options.mergeEntryProbability > 0 && options.mergeEntryProbability <= 1))
    return Status::error("--merge-entry-probability must lie in (0, 1], got ", options.mergeEntryProbability);
  auto fraction = [](double p) { return p >= 0 && p <= 1; };
  if (!(options.mergeLayerProbability > 0 && options.mergeLayerProbability <= 1) ||
      !(options.layerProbability > 0 && options.layerProbability <= 1) || !fraction(options.crossoverProbability) ||
      !fraction(options.crossoverFromFirst) || !fraction(options.normalizeProbability) ||
      !fraction(options.swapProbability) || !(options.parentThreshold >= 0) || !(options.mergeParentThreshold >= 0) ||
      options.crossoverParents < 2)
    return Status::error("the search's probabilities must lie in [0, 1] (a layer's chance of changing in (0, 1]), "
                         "its thresholds be >= 0 and crossover draw from at least 2 parents");
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

namespace {

/// EEP's second stage from the pruning stage's best (see ExpertSearch.h).
Status searchMerges(Engine &engine, const std::vector<SearchLayer> &layers,
                    const std::function<Expected<double>(const std::map<int64_t, std::set<int64_t>> &)> &lossOf,
                    Draws &draws, int64_t evaluation, const ExpertSearchOptions &options, ExpertSearchResult &result) {
  std::vector<SearchCandidate> &population = result.mergeArchive;
  SearchCandidate start = result.best;
  for (const SearchLayer &layer : layers) {
    std::vector<std::vector<float>> &rows = start.mix[layer.index];
    for (int64_t kept : start.kept.at(layer.index)) {
      rows.emplace_back(static_cast<size_t>(layer.experts), 0.0f);
      rows.back()[static_cast<size_t>(kept)] = 1.0f;
    }
  }
  population.push_back(start);
  const std::map<int64_t, std::set<int64_t>> masks = masksOf(layers, start);
  for (int64_t merged = 0; merged < options.mergeEvaluations; ++merged) {
    const std::vector<bool> changes = layersThatChange(layers.size(), options.mergeLayerProbability, draws);
    SearchCandidate child;
    if (population.size() >= 2 && draws.unit() < options.crossoverProbability) {
      const int64_t within = parentsWithin(population, options.parentThreshold, options.crossoverParents);
      const int64_t a = draws.below(within);
      int64_t b = draws.below(within - 1);
      b += b >= a ? 1 : 0;
      const SearchCandidate &first = population[static_cast<size_t>(a)], &second = population[static_cast<size_t>(b)];
      child = first;
      for (size_t l = 0; l < layers.size(); ++l) {
        const int64_t index = layers[l].index;
        std::vector<std::vector<float>> &rows = child.mix[index];
        if (changes[l]) {
          for (size_t j = 0; j < rows.size(); ++j)
            if (draws.unit() >= options.crossoverFromFirst)
              rows[j] = second.mix.at(index)[j];
        } else if (draws.unit() >= options.crossoverFromFirst) {
          rows = second.mix.at(index);
        }
      }
    } else {
      child = population[static_cast<size_t>(draws.below(parentsWithin(population, options.mergeParentThreshold, 1)))];
    }
    for (size_t l = 0; l < layers.size(); ++l)
      if (changes[l])
        for (std::vector<float> &row : child.mix[layers[l].index])
          for (float &c : row)
            if (draws.unit() < options.mergeEntryProbability)
              c = static_cast<float>(static_cast<double>(c) + draws.gauss() * options.mergeScale);
    if (draws.unit() < options.normalizeProbability)
      for (auto &[layer, rows] : child.mix)
        for (std::vector<float> &row : rows) {
          double sum = 0;
          for (float c : row)
            sum += c;
          if (std::fabs(sum) > 1e-6)
            for (float &c : row)
              c = static_cast<float>(static_cast<double>(c) / sum);
        }
    Expected<std::map<int64_t, std::map<int64_t, std::shared_ptr<const MlpWeights>>>> replaced =
        replacedExperts(engine, child);
    if (!replaced)
      return replaced.status();
    MOE_RETURN_IF_ERROR(engine.setReplacedExperts(replaced.take()));
    Expected<double> loss = lossOf(masks);
    MOE_RETURN_IF_ERROR(engine.setReplacedExperts({}));
    if (!loss)
      return loss.status();
    child.loss = *loss;
    const bool improved = insertSorted(population, std::move(child));
    if (options.onEvaluation)
      options.onEvaluation(evaluation + merged + 1, population.front(), improved);
  }
  result.best = population.front();
  return Status::success();
}

} // namespace

Expected<ExpertSearchResult> searchExpertPruning(Engine &engine, const std::vector<EvalStream> &streams,
                                                 const ExpertSearchOptions &options) {
  const ModelSpec &spec = engine.spec();
  MOE_RETURN_IF_ERROR(checkExpertSearchOptions(spec, options));
  const std::vector<SearchLayer> layers = searchLayers(spec, options);
  if (options.mergeEvaluations > 0)
    MOE_RETURN_IF_ERROR(checkMergeable(engine, layers));
  EvalOptions evalOptions{options.sequenceLength, 0, options.maxTokens};
  evalOptions.progressLabel = "search";
  struct Restore {
    Engine &engine;
    ~Restore() {
      (void)engine.setMaskedExperts({});
      (void)engine.setReplacedExperts({});
    }
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
    const bool improved = insertSorted(archive, std::move(candidate));
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
        child.kept = archive[static_cast<size_t>(draws.below(parentsWithin(archive, options.parentThreshold, 1)))].kept;
        const std::vector<bool> changes = layersThatChange(layers.size(), options.layerProbability, draws);
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
  result.pruningLoss = archive.front().loss;
  if (options.mergeEvaluations > 0)
    MOE_RETURN_IF_ERROR(searchMerges(engine, layers, lossOf, draws, evaluation, options, result));
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
  char figures[384];
  std::snprintf(figures, sizeof figures,
                "mean loss %.6f (perplexity %.4f) on the search windows after %zu evaluations; original %.6f, "
                "most-routed experts kept %.6f",
                result.best.loss, std::exp(result.best.loss), result.archive.size() + result.mergeArchive.size(),
                result.originalLoss, result.frequencyLoss);
  std::string description = "EEP pruning search (moec search, seed " + std::to_string(options.seed) + ", ratio " +
                            std::to_string(options.ratio) + "): " + figures;
  nlohmann::json passes = nlohmann::json::array();
  const ExpertMixes mixes = mixesOf(result.best);
  if (!result.mergeArchive.empty()) {
    char merge[160];
    std::snprintf(merge, sizeof merge, "; merge stage from pruning's best %.6f", result.pruningLoss);
    description = "EEP pruning and merge search" + description.substr(std::string("EEP pruning search").size()) + merge;
  }
  if (!mixes.empty())
    passes.push_back({{"pass", "moe-mix-experts"}, {"options", {{"mix", formatExpertMixes(mixes)}}}});
  passes.push_back({{"pass", "moe-drop-experts"}, {"options", {{"experts", experts}}}});
  return {{"description", description}, {"passes", passes}};
}

} // namespace moe
