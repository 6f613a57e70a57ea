//===- Recipe.h - Compression recipes, built into passes structurally -*- C++ -*-===//
//
// Part of moec. A recipe (JSON) names passes and their options and the
// calibration data. Each pass is created through its generated
// create<Pass>(Options) function with every option set from a JSON value
// of the option's own type, never by pasting text into a pass pipeline: a
// value holding `}`, `,` or spaces is just a value, a NaN cannot be
// written, and a wrong type is an error naming the recipe file and the
// JSON path of the value (passes[1].options.ratio).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PIPELINE_RECIPE_H
#define MOE_PIPELINE_RECIPE_H

#include "moe/Support/Status.h"

#include "mlir/Pass/Pass.h"

#include "moe/Transforms/PassOptions.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace moe {

struct RecipePass {
  std::string name;       ///< The pass flag, e.g. "moe-prune-experts".
  nlohmann::json options; ///< As written (for summaries).
  std::string jsonPath;   ///< "passes[1]", for messages.
  bool needsStatistics = false;
  bool sequentialGptq = false;         ///< moe-quantize with method=gptq.
  double minCoverage = 0.005;          ///< moe-quantize's RTN fallback threshold.
  bool quantizesOutsideLayers = false; ///< moe-quantize targets lm_head or embedding.
  bool quantizesExperts = false;       ///< moe-quantize targets routed experts.
  bool quantizesDenseMoments =
      false; ///< moe-quantize targets matrices GPTQ reads per-layer moments for (attention, shared).
  std::vector<QuantizeTarget> quantizeTargets; ///< moe-quantize's targets, as written (empty: routed experts).
  bool gptqInFloat = false;                    ///< moe-quantize: GPTQ's arithmetic in float (precision=f32).
  int quantizeCodeBits =
      8; ///< moe-quantize: its codes' bits (a llama.cpp format: 8, the most any has; nested: one more).
  /// moe-prune-experts with "tasks": one pruned expert set per task (its
  /// own calibration data), stored side by side (TaskSets.h) instead of
  /// pruning the model once. Name and data path, in the recipe's order.
  std::vector<std::pair<std::string, std::string>> tasks;
};

struct Recipe {
  std::string path;
  std::vector<RecipePass> passes;
  std::string calibrationData;
  int64_t calibrationTokens = 0, sequenceLength = 256, blockSamples = 1024;
  double sampleCapRatio = 0;
  bool inputMoments = false; ///< A pass reads the large input moments.
  bool floatMoments = false; ///< calibration.moments "f32": input moments accumulated in float.
  bool gradients = false;    ///< A pass reads backward-pass statistics (HEAPr).
};

/// Reads and checks `path` (JSON, or YAML when it ends in .yaml or .yml):
/// every key, every pass name and every option's type and value (each pass
/// is built once to check it). Errors name the file, the JSON path of the
/// bad value and, in YAML files, its line.
Expected<Recipe> readRecipe(const std::string &path);

/// A recipe that ships with moec (`moec compress --preset NAME`).
struct Preset {
  const char *name;
  const char *description;
  const char *recipe; ///< JSON; calibration data comes from --calib-data.
};
const std::vector<Preset> &presets();
/// The preset `name` as a recipe, or an error listing the presets.
Expected<Recipe> presetRecipe(const std::string &name);

/// The passes a recipe may name.
std::vector<std::string> recipePassNames();
/// The pass `name` with every option at its default, as pipeline text
/// (`moec passes` shows it; never parsed back).
std::string passDefaults(const std::string &name);

/// "; did you mean 'x'?" for the candidate nearest `word`, or "".
std::string didYouMean(const std::string &word, const std::vector<std::string> &candidates);

/// What buildRecipePass may set besides the recipe's options.
struct PassOverrides {
  std::string stats;                    ///< Statistics file, for passes that read one.
  std::optional<int64_t> layer;         ///< moe-quantize: only this layer (-1: outside layers).
  std::optional<QuantizeMethod> method; ///< moe-quantize: another method (rtn for lm_head).
  std::vector<int64_t> experts;         ///< moe-quantize: of the routed experts only these slots; empty: all.
  bool routedOnly = false;              ///< moe-quantize: routed experts only, whatever the targets.
  std::string codes;                    ///< moe-quantize: take the matrices' codes from this file.
  /// moe-quantize: of the layer matrices outside routed experts, only share
  /// `share` of `shares` (one per process of a distributed run).
  int64_t share = 0, shares = 1;
};

/// The pass of `pass` with its options set from the recipe and `overrides`.
Expected<std::unique_ptr<mlir::Pass>> buildRecipePass(const Recipe &recipe, const RecipePass &pass,
                                                      const PassOverrides &overrides);

/// "moe-prune-experts{method=easy-ep ratio=0.25}", for progress lines only;
/// never parsed.
std::string describeRecipePass(const RecipePass &pass);

} // namespace moe

#endif // MOE_PIPELINE_RECIPE_H
