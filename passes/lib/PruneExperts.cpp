//===- PruneExperts.cpp - Remove the lowest-scored experts ----------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "PassSupport.h"
#include "moe/Calibration/StatisticNames.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Lowering/TensorAccess.h"
#include "moe/Runtime/MoeBlock.h"
#include "moe/Support/Progress.h"
#include "moe/Support/Threads.h"
#include "moe/Transforms/Passes.h"

#include "ExpertEditing.h"
#include "LayerLoader.h"
#include "StatisticsReader.h"
#include "SuperExperts.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <set>

namespace moe {
#define GEN_PASS_DEF_MOEPRUNEEXPERTS
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

struct Candidate {
  int64_t layer, expert;
  double score;
};

/// Memory for NAEE's search: one chunk's expert outputs, and the products
/// of every sample kept between searches when they fit.
constexpr size_t kSearchBytes = size_t{512} << 20;

/// Number of k-subsets of n, saturating at `limit` + 1.
int64_t subsetCount(int64_t n, int64_t k, int64_t limit) {
  double count = 1;
  for (int64_t i = 0; i < k; ++i) {
    count = count * static_cast<double>(n - i) / static_cast<double>(i + 1);
    if (count > static_cast<double>(limit))
      return limit + 1;
  }
  return static_cast<int64_t>(std::llround(count));
}

struct PruneExpertsPass : public moe::impl::MoePruneExpertsBase<PruneExpertsPass> {
  using MoePruneExpertsBase::MoePruneExpertsBase;

  void runOnOperation() override {
    ir::ModelOp module = getOperation();
    const bool reconstruction = method == ExpertScore::Reconstruction;
    const bool global = scope == PruneScope::Global;
    const char *statistic = method == ExpertScore::GateWeight ? stats::kGateWeightSum
                            : method == ExpertScore::EasyEp   ? stats::kEasyEpScore
                            : method == ExpertScore::Tcess    ? stats::kTopLogitSum
                                                              : stats::kRoutedTokens;
    if (reconstruction && global) {
      module.emitError("moe-prune-experts: method reconstruction searches each layer's subset (NAEE); use scope=layer");
      return signalPassFailure();
    }
    if (!(ratio >= 0.0 && ratio < 1.0) || keep < 0 || (keep > 0 && ratio > 0.0) || (keep > 0 && global)) {
      passError(module, getArgument()) << "give ratio in [0, 1) or keep > 0 (per layer), not both";
      return signalPassFailure();
    }
    if (maxSubsets < 1 || searchBudget < 0) {
      passError(module, getArgument()) << "max-subsets must be positive and search-budget not negative, got "
                                       << maxSubsets << " and " << searchBudget;
      return signalPassFailure();
    }
    ir::ModelOp model = module;
    FailureOr<StatisticsReader> file = StatisticsReader::openForExperts(stats, model, getArgument());
    if (failed(file))
      return signalPassFailure();
    // Scores, super experts and per-layer limits.
    std::vector<Candidate> candidates;
    std::map<int64_t, ir::LayerOp> layers;
    std::map<int64_t, int64_t> liveExperts, topK;
    for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
      BlockParts parts = blockParts(layer);
      if (!parts.block)
        continue;
      int64_t index = static_cast<int64_t>(layer.getIndex());
      layers[index] = layer;
      topK[index] = static_cast<int64_t>(parts.router.getTopK());
      FailureOr<std::vector<double>> scores = file->layer(index, statistic, layer);
      if (failed(scores))
        return signalPassFailure();
      for (ir::ExpertOp expert : parts.experts) {
        int64_t id = static_cast<int64_t>(expert.getId());
        if (id >= static_cast<int64_t>(scores->size())) {
          passError(expert, getArgument()) << "the statistics have " << scores->size() << " experts for layer " << index
                                           << "; calibrate the model as it is now";
          return signalPassFailure();
        }
        candidates.push_back({index, id, (*scores)[id]});
        ++liveExperts[index];
      }
    }
    std::set<std::pair<int64_t, int64_t>> protectedExperts;
    if (protectSuperExperts) {
      FailureOr<std::set<std::pair<int64_t, int64_t>>> found = findSuperExperts(*file, model, getArgument());
      if (failed(found))
        return signalPassFailure();
      protectedExperts = std::move(*found);
      superExpertsProtected += static_cast<int64_t>(protectedExperts.size());
    }
    auto budgetFor = [&](int64_t layer) {
      int64_t budget = keep > 0 ? std::max<int64_t>(0, liveExperts[layer] - keep)
                                : static_cast<int64_t>(std::llround(ratio * static_cast<double>(liveExperts[layer])));
      return std::min(budget, liveExperts[layer] - topK[layer]);
    };

    std::map<int64_t, std::set<int64_t>> drop;
    if (reconstruction) {
      if (failed(searchReconstruction(model, *file, layers, protectedExperts, budgetFor, drop)))
        return signalPassFailure();
    } else {
      // Lowest scores first; ties keep the lower id.
      std::sort(candidates.begin(), candidates.end(), [](const Candidate &a, const Candidate &b) {
        return a.score != b.score ? a.score < b.score : (a.layer != b.layer ? a.layer < b.layer : a.expert > b.expert);
      });
      int64_t globalBudget = static_cast<int64_t>(std::llround(ratio * static_cast<double>(candidates.size())));
      int64_t dropped = 0;
      for (const Candidate &candidate : candidates) {
        if (protectedExperts.count({candidate.layer, candidate.expert}))
          continue;
        std::set<int64_t> &layerDrop = drop[candidate.layer];
        int64_t remaining = liveExperts[candidate.layer] - static_cast<int64_t>(layerDrop.size());
        if (remaining - 1 < topK[candidate.layer])
          continue;
        if (!global ? static_cast<int64_t>(layerDrop.size()) >= budgetFor(candidate.layer) : dropped >= globalBudget)
          continue;
        layerDrop.insert(candidate.expert);
        ++dropped;
      }
    }
    // What was decided and why, in the module (History.h), before the
    // drop renumbers the experts. A pass that removes nothing leaves the
    // module as it was.
    const bool removesAny = std::any_of(drop.begin(), drop.end(), [](const auto &d) { return !d.second.empty(); });
    for (const auto &[index, layer] : layers) {
      if (!removesAny)
        break;
      LayerDecision decision;
      decision.pass = getArgument().str();
      decision.method = choiceName(static_cast<ExpertScore>(method)).str();
      decision.layer = index;
      decision.scoreName = reconstruction ? "" : statistic;
      if (failed(file->fillRouting(index, layer, decision)))
        return signalPassFailure();
      std::map<int64_t, double> scoreOf;
      for (const Candidate &candidate : candidates)
        if (candidate.layer == index)
          scoreOf[candidate.expert] = candidate.score;
      for (ir::ExpertOp expert : blockParts(layer).experts) {
        const int64_t id = static_cast<int64_t>(expert.getId());
        decision.experts.push_back(expert.getOriginalId());
        if (!reconstruction)
          decision.scores.push_back(scoreOf[id]);
        if (drop[index].count(id))
          decision.removed.push_back(expert.getOriginalId());
        if (protectedExperts.count({index, id}))
          decision.protectedExperts.push_back(expert.getOriginalId());
      }
      recordDecision(model, decision);
    }
    TensorAccess access(model);
    for (const auto &[index, ids] : drop) {
      if (ids.empty())
        continue;
      DropCounts counts;
      if (failed(dropExperts(model, layers[index], ids, access, getArgument(), counts)))
        return signalPassFailure();
      expertsPruned += counts.experts;
    }
  }

  /// NAEE: per layer, the set of experts whose removal changes the cached
  /// block outputs least (Frobenius norm over the calibration samples,
  /// from MaskedBlockErrors' products); every subset when there are at most
  /// max-subsets and subsets x samples fits search-budget, else a greedy
  /// search that removes one expert at a time.
  template <typename Budget>
  LogicalResult searchReconstruction(ir::ModelOp model, const StatisticsReader &file,
                                     const std::map<int64_t, ir::LayerOp> &layers,
                                     const std::set<std::pair<int64_t, int64_t>> &protectedExperts,
                                     const Budget &budgetFor, std::map<int64_t, std::set<int64_t>> &drop) {
    FailureOr<LayerLoader> loader = LayerLoader::create(model, getArgument());
    if (failed(loader))
      return failure();
    const ModelSpec &spec = loader->spec();
    for (auto [index, layer] : layers) {
      const int64_t budget = budgetFor(index);
      if (!(budget > 0))
        continue;
      FailureOr<StatisticsReader::BlockSamples> blocks = file.blockSamples(index, spec.hiddenSize, layer);
      if (failed(blocks))
        return failure();
      FailureOr<LayerWeights> loaded = loader->load(layer);
      if (failed(loaded))
        return failure();
      const LayerWeights &weights = *loaded;
      if (!weights.routing.remap.empty())
        return passError(layer, getArgument()) << "layer " << index << " has merged experts";
      const LayerSpec &layerSpec = spec.layers[static_cast<size_t>(index)];
      std::vector<int64_t> choices;
      for (int64_t e = 0; e < weights.router.rows; ++e)
        if (!protectedExperts.count({index, e}))
          choices.push_back(e);
      const int64_t toDrop = std::min<int64_t>(budget, static_cast<int64_t>(choices.size()));
      const int64_t n = static_cast<int64_t>(choices.size()), E = weights.router.rows;
      const int64_t subsets = subsetCount(n, toDrop, maxSubsets);
      const int64_t samples = blocks->count;
      // The exhaustive search costs one routing per subset and sample.
      const bool exhaustive = subsets <= maxSubsets && static_cast<double>(subsets) * static_cast<double>(samples) <=
                                                           static_cast<double>(searchBudget) * 1e6;
      // Samples per chunk, so the expert outputs of one chunk stay within
      // kSearchBytes; the products of every chunk are kept when they fit.
      const size_t perSample = MaskedBlockErrors::bytesPerSample(E, spec.hiddenSize);
      const int64_t chunkSize = std::clamp<int64_t>(static_cast<int64_t>(kSearchBytes / perSample), 1, samples);
      const bool keepChunks =
          static_cast<size_t>(samples) * static_cast<size_t>(1 + E + E * E) * sizeof(double) <= kSearchBytes;
      std::vector<MaskedBlockErrors> kept;
      auto forEachChunk = [&](const auto &body) {
        if (keepChunks && !kept.empty()) {
          for (const MaskedBlockErrors &chunk : kept)
            body(chunk);
          return;
        }
        for (int64_t first = 0; first < samples; first += chunkSize) {
          const int64_t size = std::min(chunkSize, samples - first);
          BlockSamplesView view{blocks->input.data() + first * spec.hiddenSize,
                                blocks->output.data() + first * spec.hiddenSize, size};
          MaskedBlockErrors chunk(spec, layerSpec, weights, view);
          body(chunk);
          if (keepChunks)
            kept.push_back(std::move(chunk));
        }
      };
      // Squared block-output error of each candidate set of dropped rows
      // (`sets` rows of `width` choices), summed over every chunk.
      auto errorsOf = [&](const std::vector<int32_t> &sets, int64_t width) {
        const int64_t count = static_cast<int64_t>(sets.size()) / std::max<int64_t>(width, 1);
        std::vector<double> errors(static_cast<size_t>(count), 0.0);
        forEachChunk([&](const MaskedBlockErrors &chunk) {
          splitAcrossThreads(count, [&](int64_t begin, int64_t end) {
            std::vector<uint8_t> masked(static_cast<size_t>(E));
            for (int64_t i = begin; i < end; ++i) {
              std::fill(masked.begin(), masked.end(), 0);
              for (int64_t j = 0; j < width; ++j)
                masked[static_cast<size_t>(sets[static_cast<size_t>(i * width + j)])] = 1;
              errors[static_cast<size_t>(i)] += chunk.squaredError(masked.data());
            }
          });
        });
        subsetsEvaluated += count;
        return errors;
      };
      Progress progress(concat("NAEE search, layer ", index, exhaustive ? " (every subset)" : " (greedy)"),
                        exhaustive ? 1 : toDrop, exhaustive ? "searches" : "steps");
      std::set<int64_t> best;
      if (exhaustive) {
        // Every subset, in lexicographic order (ties keep the first).
        std::vector<int32_t> sets;
        sets.reserve(static_cast<size_t>(subsets * toDrop));
        std::vector<int64_t> pick(static_cast<size_t>(toDrop));
        std::iota(pick.begin(), pick.end(), 0);
        while (true) {
          for (int64_t i : pick)
            sets.push_back(static_cast<int32_t>(choices[static_cast<size_t>(i)]));
          int64_t i = toDrop - 1;
          while (i >= 0 && pick[static_cast<size_t>(i)] == n - toDrop + i)
            --i;
          if (i < 0)
            break;
          ++pick[static_cast<size_t>(i)];
          for (int64_t j = i + 1; j < toDrop; ++j)
            pick[static_cast<size_t>(j)] = pick[static_cast<size_t>(j - 1)] + 1;
        }
        std::vector<double> errors = errorsOf(sets, toDrop);
        const size_t argmin = static_cast<size_t>(std::min_element(errors.begin(), errors.end()) - errors.begin());
        best.insert(sets.begin() + static_cast<std::ptrdiff_t>(argmin * toDrop),
                    sets.begin() + static_cast<std::ptrdiff_t>((argmin + 1) * toDrop));
        progress.advance();
      } else {
        // One expert at a time: the one whose removal, with those already
        // removed, changes the outputs least.
        for (int64_t step = 0; step < toDrop; ++step) {
          std::vector<int32_t> sets;
          std::vector<int64_t> candidates;
          for (int64_t e : choices) {
            if (best.count(e))
              continue;
            candidates.push_back(e);
            for (int64_t removed : best)
              sets.push_back(static_cast<int32_t>(removed));
            sets.push_back(static_cast<int32_t>(e));
          }
          std::vector<double> errors = errorsOf(sets, step + 1);
          best.insert(candidates[static_cast<size_t>(std::min_element(errors.begin(), errors.end()) - errors.begin())]);
          progress.advance();
        }
      }
      drop[index] = best;
    }
    return success();
  }
};

} // namespace
