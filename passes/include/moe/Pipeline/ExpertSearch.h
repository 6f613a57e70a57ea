//===- ExpertSearch.h - EEP's evolutionary search for expert pruning -*- C++ -*-===//
//
// Part of moec. `moec search`: the pruning stage of EEP (Liu et al. 2024,
// "Efficient Expert Pruning for Sparse Mixture-of-Experts Language
// Models"), gradient-free, as its released code (imagination-research/EEP,
// opencompass/tasks/search.py and search_utils.py) runs it:
//
// - a candidate keeps k experts in each searched layer (EEP's one-hot rows
//   of the expert-merging matrix, which stage 1 keeps equal to the router
//   mapping, so a candidate is a keep-set per layer);
// - ~30 random candidates start the archive; then one child per step: each
//   layer changes with probability 0.25 (at least one does), and in a
//   changing layer each kept expert is swapped for a random dropped one
//   with probability 0.15; the parent is drawn uniformly from the archive's
//   best, those within a threshold of the best candidate;
// - steady state: every candidate evaluated stays in the archive, sorted
//   by fitness; the search stops after a number of evaluations (EEP's
//   discrete stage: 100).
//
// Where moec differs, and why: fitness is the engine's mean next-token loss
// on the calibration windows (as `moec eval` takes them), not task accuracy
// from generation, since moec has a loss and no task harness; a candidate's
// masked experts are exactly the model with those experts dropped
// (moe-drop-experts), so the search masks router rows instead of rebuilding
// weights; the archive also starts with the experts the calibration windows
// route to most (a cheap candidate the search can only improve on);
// duplicate children are redrawn rather than evaluated again.
//
// EEP's second stage (--merge-evaluations; EEP runs 300 after 100): each
// kept expert j becomes sum_i C_ji x expert i over all the layer's experts
// (EEP's merge matrix C, a row per kept expert, starting one-hot). A child
// changes each layer with probability 0.25 (at least one); with
// probability 0.3 it is first a row-wise crossover of two parents (each row
// from the first with probability 0.6; the parents from those within a
// threshold of the best, at least 6), else a copy of one parent; then
// every entry of a changing layer gets, with probability 0.25, Gaussian
// noise of scale 0.065; with probability 0.1 every row is then divided by
// its sum. A candidate runs as the engine's replaced experts
// (Engine::setReplacedExperts) with the pruning masks; the recipe replays
// it as moe-mix-experts then moe-drop-experts.
//
// Where the second stage differs from EEP, and why: EEP also evolves the
// router map T (kept expert j's routing probability is sum_i T_ji p_i,
// after the softmax); moec keeps T at the pruning selection (the router
// rows of the kept experts), because a post-softmax mix of router rows is
// a routing rule no export format or peer runtime has, while merged
// weights are plain experts every backend runs. For the same reason the
// second stage starts from the best keep-set alone and keeps it (EEP's
// population carries every first-stage candidate, whose rows a crossover
// could combine into two slots routing as one expert).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PIPELINE_EXPERTSEARCH_H
#define MOE_PIPELINE_EXPERTSEARCH_H

#include "moe/Runtime/Engine.h"
#include "moe/Runtime/Evaluate.h"
#include "moe/Support/Status.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace moe {

/// Per searched layer, the expert ids kept (sorted), and its fitness.
struct SearchCandidate {
  std::map<int64_t, std::vector<int64_t>> kept;
  /// The second stage's merge matrix: per searched layer, a row per kept
  /// expert (in `kept`'s order) of coefficients over all the layer's
  /// experts. Empty: every kept expert is itself.
  std::map<int64_t, std::vector<std::vector<float>>> mix;
  double loss = 0; ///< Mean next-token loss (nats) on the search windows.
};

struct ExpertSearchOptions {
  double ratio = 0.25;         ///< Fraction of each searched layer's routed experts removed.
  std::vector<int64_t> layers; ///< Decoder layers searched; empty: every MoE layer.
  int64_t evaluations = 100;   ///< Candidates evaluated in all, the first ones included.
  int64_t initial = 30;        ///< Random candidates that start the archive.
  double layerProbability = 0.25;
  double swapProbability = 0.15;
  /// Parents come from the candidates whose loss is within this fraction
  /// of the best one's (at least the best one).
  double parentThreshold = 0.005;
  uint64_t seed = 11450; ///< EEP's seed.
  /// The second stage (expert merging): candidates evaluated after the
  /// pruning stage; 0 skips it.
  int64_t mergeEvaluations = 0;
  double mergeLayerProbability = 0.25;
  double mergeEntryProbability = 0.25;
  double mergeScale = 0.065;
  double crossoverProbability = 0.3;
  double crossoverFromFirst = 0.6;
  int64_t crossoverParents = 6;
  double normalizeProbability = 0.1;
  /// Mutation parents lie within this fraction of the best loss (EEP's
  /// threshold for mutation is three times its crossover threshold,
  /// which is parentThreshold here).
  double mergeParentThreshold = 0.015;
  /// The fitness windows, as `moec eval` takes them.
  int64_t sequenceLength = 256;
  int64_t maxTokens = 2048; ///< Per domain.
  /// Called after each evaluation (its index from 1, the best so far, and
  /// whether it just improved).
  std::function<void(int64_t evaluation, const SearchCandidate &best, bool improved)> onEvaluation;
};

struct ExpertSearchResult {
  SearchCandidate best;
  double originalLoss = 0;                   ///< Nothing dropped, on the same windows.
  double frequencyLoss = 0;                  ///< The most-routed experts kept.
  double pruningLoss = 0;                    ///< The pruning stage's best.
  std::vector<SearchCandidate> archive;      ///< Every pruning candidate evaluated, best first.
  std::vector<SearchCandidate> mergeArchive; ///< The merge stage's, its start (pruning's best) included.
};

/// Checks `options` against the model: searched layers exist and are MoE,
/// the ratio leaves at least top-k experts and drops at least one.
Status checkExpertSearchOptions(const ModelSpec &spec, const ExpertSearchOptions &options);

/// Runs the search (engine masks are set per candidate and cleared after).
Expected<ExpertSearchResult> searchExpertPruning(Engine &engine, const std::vector<EvalStream> &streams,
                                                 const ExpertSearchOptions &options);

/// The recipe that replays `best`: moe-mix-experts of its merged experts
/// (when it has any), then moe-drop-experts of every expert not kept, with
/// the search's figures in its description.
nlohmann::json expertSearchRecipe(const ModelSpec &spec, const ExpertSearchResult &result,
                                  const ExpertSearchOptions &options);

} // namespace moe

#endif // MOE_PIPELINE_EXPERTSEARCH_H
