//===- Search.cpp - moec search: EEP's evolutionary expert-pruning search -===//
//
// Part of moec. Searches which experts each layer keeps, and optionally how
// dropped experts are merged into kept ones, by the engine's loss on
// calibration windows (moe/Pipeline/ExpertSearch.h), and writes the best so
// far, after every improvement, as a recipe `moec compress` replays.
//
//===----------------------------------------------------------------------===//

#include "Commands.h"

#include "moe/Pipeline/ExpertSearch.h"
#include "moe/Support/AtomicFile.h"

#include <cmath>
#include <cstdio>
#include <filesystem>

namespace moe::cli {
namespace {

struct SearchCommandOptions {
  ModelOptions model;
  std::string data, output;
  ExpertSearchOptions search;
  bool verbose = false;
};

int runSearch(SearchCommandOptions options) {
  Expected<ModelAndData> input = openModelAndData(options.model, options.data);
  if (!input) {
    printError(input.status().message());
    return 1;
  }
  LoadedModel &model = input->model;
  const std::filesystem::path folder = std::filesystem::path(options.output).parent_path();
  if (!folder.empty() && !std::filesystem::is_directory(folder)) {
    printError(options.output + ": the folder " + folder.string() + " does not exist");
    return 1;
  }
  if (Status checked = checkExpertSearchOptions(model.spec, options.search); !checked.ok()) {
    printError(checked.message());
    return 1;
  }
  // The best so far is written after every improvement, so a search
  // stopped early leaves a usable recipe.
  Status written = Status::success();
  ExpertSearchResult partial;
  options.search.onEvaluation = [&](int64_t evaluation, const SearchCandidate &best, bool improved) {
    if (!improved || !written.ok())
      return;
    partial.best = best;
    std::printf("evaluation %lld: best loss %.6f (perplexity %.4f)\n", static_cast<long long>(evaluation), best.loss,
                std::exp(best.loss));
    std::fflush(stdout);
    written =
        writeTextAtomically(options.output, expertSearchRecipe(model.spec, partial, options.search).dump(2) + "\n");
  };
  Expected<ExpertSearchResult> result = searchExpertPruning(*model.engine, input->streams, options.search);
  if (!result) {
    printError(result.status().message());
    return 1;
  }
  if (!written.ok()) {
    printError(written.message());
    return 1;
  }
  Status status =
      writeTextAtomically(options.output, expertSearchRecipe(model.spec, *result, options.search).dump(2) + "\n");
  if (!status.ok()) {
    printError(status.message());
    return 1;
  }
  std::printf("searched %zu candidates: best loss %.6f (perplexity %.4f); most-routed experts kept %.6f (%.4f); "
              "original %.6f (%.4f)\n",
              result->archive.size() + result->mergeArchive.size(), result->best.loss, std::exp(result->best.loss),
              result->frequencyLoss, std::exp(result->frequencyLoss), result->originalLoss,
              std::exp(result->originalLoss));
  if (!result->mergeArchive.empty())
    std::printf("merge stage: %zu candidates from the pruning stage's best %.6f (perplexity %.4f)\n",
                result->mergeArchive.size() - 1, result->pruningLoss, std::exp(result->pruningLoss));
  std::printf("recipe: %s (moec compress MODEL --recipe %s -o OUT.moepkg)\n", options.output.c_str(),
              options.output.c_str());
  return 0;
}

} // namespace

Command registerSearch(CLI::App &app) {
  auto options = std::make_shared<SearchCommandOptions>();
  CLI::App *command = app.add_subcommand(
      "search", "EEP's evolutionary search for which experts each layer keeps, by the model's loss on calibration "
                "data (gradient-free); writes the best as a recipe for moec compress");
  addModelOptions(command, options->model);
  ExpertSearchOptions &s = options->search;
  command->add_option("--data", options->data, "Calibration data (text, .jsonl or .u32)")->required();
  command->add_option("-o,--output", options->output, "Recipe to write (JSON; rewritten at each improvement)")
      ->required();
  command->add_option("--ratio", s.ratio, "Fraction of each searched layer's routed experts removed")
      ->capture_default_str();
  command->add_option("--layers", s.layers, "Layers to search (default: every MoE layer)")->delimiter(',');
  command->add_option("--evaluations", s.evaluations, "Candidates evaluated in all (EEP's pruning stage: 100)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  command->add_option("--initial", s.initial, "Random candidates that start the archive (EEP: ~30)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  command
      ->add_option("--merge-evaluations", s.mergeEvaluations,
                   "EEP's second stage: candidate expert merges evaluated after pruning (EEP: 300; 0: none)")
      ->capture_default_str();
  command
      ->add_option("--merge-scale", s.mergeScale,
                   "Merge stage: the standard deviation of the noise added to a coefficient (EEP: 0.065)")
      ->capture_default_str();
  command
      ->add_option("--merge-entry-probability", s.mergeEntryProbability,
                   "Merge stage: the chance that a coefficient of a changing layer gets noise (EEP: 0.25)")
      ->capture_default_str();
  command->add_option("--seed", s.seed, "Random seed (the same seed gives the same search)")->capture_default_str();
  command
      ->add_option("--max-tokens,--tokens", s.maxTokens,
                   "Fitness tokens per domain of the data, as moec eval takes them")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  command->add_option("--seq-len", s.sequenceLength, "Window length")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  return {command, [options] { return runSearch(*options); }};
}

} // namespace moe::cli
