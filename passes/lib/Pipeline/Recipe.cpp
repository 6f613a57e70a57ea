//===- Recipe.cpp - Compression recipes, built into passes structurally ---===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/Recipe.h"
#include "common/GgmlFormats.h"
#include "moe/Support/File.h"
#include "moe/Transforms/Passes.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <set>

namespace moe {

using json = nlohmann::json;

std::string didYouMean(const std::string &word, const std::vector<std::string> &candidates) {
  std::string best;
  unsigned bestDistance = ~0u;
  for (const std::string &candidate : candidates) {
    const unsigned distance = llvm::StringRef(candidate).edit_distance(word);
    if (distance < bestDistance) {
      bestDistance = distance;
      best = candidate;
    }
  }
  if (best.empty() || bestDistance > std::max<size_t>(2, word.size() / 3))
    return "";
  return "; did you mean '" + best + "'?";
}

namespace {

std::string joinWords(const std::vector<std::string> &words) {
  std::string out;
  for (const std::string &word : words)
    out += (out.empty() ? "" : ", ") + word;
  return out;
}

/// The items of "a,b,c" (an empty text is one empty item).
std::vector<std::string> splitCommas(const std::string &list) {
  std::vector<std::string> items;
  for (size_t start = 0;;) {
    const size_t comma = list.find(',', start);
    items.push_back(list.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos)
      return items;
    start = comma + 1;
  }
}

/// Reads a pass's options from a recipe's JSON object, each by its own
/// type; remembers the first error, naming the JSON path.
class OptionReader {
public:
  OptionReader(const json &options, std::string where) : options(options), where(std::move(where)) {}

  void text(const char *key, std::string &out) {
    if (const json *value = find(key)) {
      if (!value->is_string())
        return fail(key, "must be a string", *value);
      out = value->get<std::string>();
    }
  }
  void integer(const char *key, int64_t &out) {
    if (const json *value = find(key)) {
      if (value->is_number_integer()) {
        out = value->get<int64_t>();
        return;
      }
      if (value->is_number_float() && std::isfinite(value->get<double>()) &&
          std::floor(value->get<double>()) == value->get<double>() && std::fabs(value->get<double>()) < 9e15) {
        out = static_cast<int64_t>(value->get<double>());
        return;
      }
      fail(key, "must be an integer", *value);
    }
  }
  void real(const char *key, double &out) {
    if (const json *value = find(key)) {
      if (!value->is_number() || !std::isfinite(value->get<double>()))
        return fail(key, "must be a finite number", *value);
      out = value->get<double>();
    }
  }
  void flag(const char *key, bool &out) {
    if (const json *value = find(key)) {
      if (!value->is_boolean())
        return fail(key, "must be true or false", *value);
      out = value->get<bool>();
    }
  }
  /// One of an enum's spellings (moe/Transforms/PassOptions.h).
  template <typename E> void choice(const char *key, E &out) {
    if (const json *value = find(key)) {
      std::optional<E> parsed = value->is_string() ? parseChoice<E>(value->get<std::string>()) : std::nullopt;
      if (!parsed)
        return fail(key, ("must be " + choiceList<E>()).c_str(), *value);
      out = *parsed;
    }
  }
  /// A list of an enum's spellings: ["experts", "shared"], one of them, or
  /// the text "experts,shared".
  template <typename E> void choices(const char *key, std::vector<E> &out) {
    const json *value = find(key);
    if (!value)
      return;
    std::vector<std::string> words;
    if (value->is_string()) {
      words = splitCommas(value->get<std::string>());
    } else if (value->is_array()) {
      for (const json &item : *value)
        words.push_back(item.is_string() ? item.get<std::string>() : std::string());
    }
    out.clear();
    for (const std::string &word : words)
      if (std::optional<E> parsed = parseChoice<E>(word))
        out.push_back(*parsed);
      else
        return fail(key, ("must be a list of " + choiceList<E>()).c_str(), *value);
    if (out.empty())
      fail(key, ("must be a list of " + choiceList<E>()).c_str(), *value);
  }
  /// A list of words or integers: ["q2_k", "q4_k"], [2, 4], one of them, or
  /// the text "2,4"; each item as text.
  void words(const char *key, std::vector<std::string> &out, const std::function<bool(const std::string &)> &valid,
             const char *expected) {
    const json *value = find(key);
    if (!value)
      return;
    out.clear();
    auto item = [&](const json &v) -> bool {
      if (v.is_string() && !v.get<std::string>().empty())
        out.push_back(v.get<std::string>());
      else if (v.is_number_integer())
        out.push_back(std::to_string(v.get<int64_t>()));
      else
        return false;
      return true;
    };
    bool ok = true;
    if (value->is_string()) {
      for (const std::string &word : splitCommas(value->get<std::string>()))
        ok &= item(json(word));
    } else if (value->is_array()) {
      for (const json &v : *value)
        ok &= item(v);
    } else {
      ok = item(*value);
    }
    for (const std::string &word : out)
      ok &= valid(word);
    if (!ok || out.empty())
      fail(key, expected, *value);
  }
  /// A list of integers: [0, 2], one integer, or the text "0,2".
  void integers(const char *key, std::vector<int64_t> &out) {
    const json *value = find(key);
    if (!value)
      return;
    out.clear();
    auto bad = [&] { fail(key, "must be a list of integers ([0, 2] or \"0,2\")", *value); };
    if (value->is_number_integer()) {
      out.push_back(value->get<int64_t>());
    } else if (value->is_array()) {
      for (const json &item : *value) {
        if (!item.is_number_integer())
          return bad();
        out.push_back(item.get<int64_t>());
      }
    } else if (value->is_string()) {
      for (const std::string &item : splitCommas(value->get<std::string>())) {
        if (item.empty() || item.find_first_not_of("-0123456789") != std::string::npos || item.size() > 18)
          return bad();
        out.push_back(std::stoll(item));
      }
    } else {
      return bad();
    }
  }

  /// The first error, or an error for a key no reader asked for.
  Status finish(const std::string &passName) {
    if (!status.ok())
      return status;
    for (const auto &[key, value] : options.items())
      if (!asked.count(key)) {
        const std::vector<std::string> names(asked.begin(), asked.end());
        return Status::error(where, ".", key, ": ", passName, " has no such option", didYouMean(key, names),
                             " (it has: ", joinWords(names), ")");
      }
    return Status::success();
  }

private:
  const json *find(const char *key) {
    asked.insert(key);
    auto it = options.find(key);
    return it == options.end() ? nullptr : &*it;
  }
  void fail(const char *key, const char *expected, const json &value) {
    if (status.ok())
      status = Status::error(where, ".", key, ": ", expected, ", got ", value.dump());
  }

  const json &options;
  std::string where;
  std::set<std::string> asked;
  Status status;
};

/// Builds one pass from its reader; fills what compress needs to know.
using PassBuilder = std::function<std::unique_ptr<mlir::Pass>(OptionReader &, const PassOverrides &, RecipePass &)>;

/// The statistics file: the recipe's own, else the one compress supplies.
void setStats(OptionReader &read, const PassOverrides &overrides, std::string &stats) {
  read.text("stats", stats);
  if (stats.empty())
    stats = overrides.stats;
}

const std::map<std::string, PassBuilder> &passBuilders() {
  static const std::map<std::string, PassBuilder> builders = {
      {"moe-drop-experts",
       [](OptionReader &read, const PassOverrides &, RecipePass &) {
         MoeDropExpertsOptions o;
         read.text("experts", o.experts);
         return createMoeDropExperts(o);
       }},
      {"moe-mix-experts",
       [](OptionReader &read, const PassOverrides &, RecipePass &) {
         MoeMixExpertsOptions o;
         read.text("mix", o.mix);
         return createMoeMixExperts(o);
       }},
      {"moe-factor-experts",
       [](OptionReader &read, const PassOverrides &overrides, RecipePass &meta) {
         MoeFactorExpertsOptions o;
         setStats(read, overrides, o.stats);
         read.real("ratio", o.ratio);
         read.integer("rank-multiple", o.rankMultiple);
         read.flag("whiten", o.whiten);
         meta.needsStatistics = true;
         return createMoeFactorExperts(o);
       }},
      {"moe-set-topk",
       [](OptionReader &read, const PassOverrides &, RecipePass &) {
         MoeSetTopkOptions o;
         std::vector<int64_t> layers;
         read.integer("top-k", o.topK);
         read.integers("layers", layers);
         o.layers = layers;
         return createMoeSetTopk(o);
       }},
      {"moe-prune-experts",
       [](OptionReader &read, const PassOverrides &overrides, RecipePass &meta) {
         MoePruneExpertsOptions o;
         setStats(read, overrides, o.stats);
         read.choice("method", o.method);
         read.real("ratio", o.ratio);
         read.integer("keep", o.keep);
         read.choice("scope", o.scope);
         read.flag("protect-super-experts", o.protectSuperExperts);
         read.integer("max-subsets", o.maxSubsets);
         read.integer("search-budget", o.searchBudget);
         meta.needsStatistics = true;
         return createMoePruneExperts(o);
       }},
      {"moe-dynamic-skip",
       [](OptionReader &read, const PassOverrides &overrides, RecipePass &meta) {
         MoeDynamicSkipOptions o;
         setStats(read, overrides, o.stats);
         read.real("quantile", o.quantile);
         meta.needsStatistics = true;
         return createMoeDynamicSkip(o);
       }},
      {"moe-merge-experts",
       [](OptionReader &read, const PassOverrides &overrides, RecipePass &meta) {
         MoeMergeExpertsOptions o;
         setStats(read, overrides, o.stats);
         read.choice("method", o.method);
         read.choice("similarity", o.similarity);
         read.real("ratio", o.ratio);
         read.integer("groups", o.groups);
         read.choice("align", o.align);
         read.real("threshold", o.threshold);
         read.flag("protect-super-experts", o.protectSuperExperts);
         meta.needsStatistics = true;
         return createMoeMergeExperts(o);
       }},
      {"moe-prune-atoms",
       [](OptionReader &read, const PassOverrides &overrides, RecipePass &meta) {
         MoePruneAtomsOptions o;
         read.choice("method", o.method);
         read.real("ratio", o.ratio);
         read.choice("scope", o.scope);
         read.real("rho", o.rho);
         read.integer("min-width", o.minWidth);
         meta.needsStatistics = o.method != AtomScore::Magnitude;
         setStats(read, meta.needsStatistics ? overrides : PassOverrides(), o.stats);
         return createMoePruneAtoms(o);
       }},
      {"moe-quantize",
       [](OptionReader &read, const PassOverrides &overrides, RecipePass &meta) {
         MoeQuantizeOptions o;
         std::vector<int64_t> layers;
         std::vector<QuantizeTarget> targets;
         read.choice("method", o.method);
         read.real("damping", o.damping);
         read.integer("block", o.block);
         read.flag("act-order", o.actOrder);
         read.choice("group-scales", o.groupScales);
         read.choice("precision", o.precision);
         read.real("min-coverage", o.minCoverage);
         read.integer("bits", o.bits);
         read.integer("group", o.group);
         read.flag("sym", o.symmetric);
         read.choice("scale-type", o.scaleType);
         read.integer("nested-bits", o.nestedBits);
         read.flag("nested-cost", o.nestedCost);
         read.choice("format", o.format);
         read.choices("targets", targets);
         o.targets = targets;
         read.integers("layers", layers);
         meta.sequentialGptq = o.method == QuantizeMethod::Gptq;
         meta.needsStatistics = meta.sequentialGptq || o.nestedCost;
         meta.minCoverage = o.minCoverage;
         meta.quantizesOutsideLayers = llvm::is_contained(targets, QuantizeTarget::LmHead) ||
                                       llvm::is_contained(targets, QuantizeTarget::Embedding);
         const bool all = llvm::is_contained(targets, QuantizeTarget::All);
         meta.quantizesExperts = targets.empty() || all || llvm::is_contained(targets, QuantizeTarget::Experts);
         meta.quantizesDenseMoments = all || llvm::is_contained(targets, QuantizeTarget::Attention) ||
                                      llvm::is_contained(targets, QuantizeTarget::Shared);
         meta.quantizeTargets = targets;
         meta.gptqInFloat = o.precision == GptqPrecision::F32;
         // (nested codes carry a second set of group headers: a bit more)
         meta.quantizeCodeBits =
             o.format == QuantizeFormat::Group ? static_cast<int>(o.bits) + (o.nestedBits > 0 ? 1 : 0) : 8;
         if (overrides.method)
           o.method = *overrides.method;
         setStats(read, o.method == QuantizeMethod::Gptq || o.nestedCost ? overrides : PassOverrides(), o.stats);
         if (overrides.layer)
           layers = {*overrides.layer};
         o.layers = layers;
         o.experts = overrides.experts;
         o.codes = overrides.codes;
         o.share = overrides.share;
         o.shares = overrides.shares;
         const std::vector<QuantizeTarget> routed = {QuantizeTarget::Experts};
         if (overrides.routedOnly)
           o.targets = routed; // (an ArrayRef: the vector outlives the pass's creation)
         return createMoeQuantize(o);
       }},
      {"moe-allocate-bits",
       [](OptionReader &read, const PassOverrides &overrides, RecipePass &meta) {
         MoeAllocateBitsOptions o;
         std::vector<std::string> candidates;
         setStats(read, overrides, o.stats);
         read.real("budget", o.budget);
         read.text("budget-bytes", o.budgetBytes);
         read.real("tolerance", o.tolerance);
         read.words(
             "candidates", candidates,
             [](const std::string &word) {
               return word == "2" || word == "3" || word == "4" || word == "8" ||
                      quant::ggmlBlockFormat(word) != nullptr;
             },
             "must be a list of widths (2, 3, 4, 8) or of llama.cpp formats (q2_k .. q6_k, q4_0 .. q8_0)");
         o.candidates = candidates;
         read.choice("granularity", o.granularity);
         read.integer("micro-size", o.microSize);
         read.choice("objective", o.objective);
         read.integer("group", o.group);
         read.flag("sym", o.symmetric);
         read.integer("pin-bits", o.pinBits);
         meta.needsStatistics = true;
         return createMoeAllocateBits(o);
       }},
  };
  return builders;
}

} // namespace

const std::vector<Preset> &presets() {
  // Measured on the fixtures in BENCHMARKS.md ("Presets"). Calibration data
  // comes from --calib-data; the token counts are what the recipes in
  // examples/ use.
  static const std::vector<Preset> list = {
      {"q8", "8-bit round-to-nearest of experts, shared experts and attention (groups of 32); no calibration",
       R"({"passes": [{"pass": "moe-quantize", "options": {"bits": 8, "group": 32,
           "targets": "experts,shared,attention"}}]})"},
      {"q4", "4-bit round-to-nearest of experts, shared experts and attention (groups of 32); no calibration",
       R"({"passes": [{"pass": "moe-quantize", "options": {"bits": 4, "group": 32,
           "targets": "experts,shared,attention"}}]})"},
      {"q4-gptq", "4-bit GPTQ of experts, shared experts and attention (groups of 32), layer by layer",
       R"({"calibration": {"tokens": 32768},
           "passes": [{"pass": "moe-quantize", "options": {"method": "gptq", "bits": 4, "group": 32,
           "targets": "experts,shared,attention"}}]})"},
      {"q3-mixed", "3.0 bits on average: MC-MoE's allocation over 2/3/4-bit experts, then GPTQ (groups of 32)",
       R"({"calibration": {"tokens": 32768, "block_samples": 1024},
           "passes": [{"pass": "moe-allocate-bits", "options": {"budget": 3.0, "candidates": "2,3,4", "group": 32}},
                      {"pass": "moe-quantize", "options": {"method": "gptq", "group": 32,
                       "targets": "experts,shared,attention"}}]})"},
      {"prune25-q4",
       "a quarter of the routed-expert neurons pruned (CAMERA sum scores per routed token, across layers), then q4",
       R"({"calibration": {"tokens": 32768},
           "passes": [{"pass": "moe-prune-atoms", "options": {"method": "camera-sum", "ratio": 0.25, "scope": "global"}},
                      {"pass": "moe-quantize", "options": {"bits": 4, "group": 32,
                       "targets": "experts,shared,attention"}}]})"},
      {"merge-q4", "a quarter of the routed experts merged (M-SMoE with neuron alignment), then q4",
       R"({"calibration": {"tokens": 32768},
           "passes": [{"pass": "moe-merge-experts", "options": {"method": "msmoe", "ratio": 0.25,
                       "align": "permutation"}},
                      {"pass": "moe-quantize", "options": {"bits": 4, "group": 32,
                       "targets": "experts,shared,attention"}}]})"},
  };
  return list;
}

std::vector<std::string> recipePassNames() {
  std::vector<std::string> names;
  for (const auto &[name, unused] : passBuilders())
    names.push_back(name);
  return names;
}

std::string passDefaults(const std::string &name) {
  auto builder = passBuilders().find(name);
  if (builder == passBuilders().end())
    return "";
  const json none = json::object();
  OptionReader reader(none, name);
  RecipePass meta;
  std::unique_ptr<mlir::Pass> pass = builder->second(reader, PassOverrides(), meta);
  std::string text;
  llvm::raw_string_ostream os(text);
  pass->printAsTextualPipeline(os);
  return os.str();
}

namespace {

Expected<std::unique_ptr<mlir::Pass>> build(const std::string &recipePath, RecipePass &pass,
                                            const PassOverrides &overrides) {
  auto builder = passBuilders().find(pass.name);
  if (builder == passBuilders().end()) {
    const std::vector<std::string> names = recipePassNames();
    return Status::error(recipePath, ": ", pass.jsonPath, ".pass: '", pass.name, "' is not a moec pass",
                         didYouMean(pass.name, names), " (", joinWords(names), ")");
  }
  OptionReader reader(pass.options, recipePath + ": " + pass.jsonPath + ".options");
  std::unique_ptr<mlir::Pass> built = builder->second(reader, overrides, pass);
  MOE_RETURN_IF_ERROR(reader.finish(pass.name));
  return built;
}

} // namespace

namespace {

/// A YAML document as JSON, with the line of every value by its path
/// ("passes[1].options.ratio"), so errors can point into the file. Plain
/// scalars become booleans, integers, numbers or null as YAML 1.2's core
/// schema reads them; quoted ones stay strings.
json yamlToJson(const YAML::Node &node, const std::string &path, std::map<std::string, int> &lines) {
  lines[path] = node.Mark().line + 1;
  switch (node.Type()) {
  case YAML::NodeType::Map: {
    json out = json::object();
    for (const auto &item : node) {
      const std::string key = item.first.Scalar();
      out[key] = yamlToJson(item.second, path.empty() ? key : path + "." + key, lines);
    }
    return out;
  }
  case YAML::NodeType::Sequence: {
    json out = json::array();
    for (size_t i = 0; i < node.size(); ++i)
      out.push_back(yamlToJson(node[i], concat(path, "[", i, "]"), lines));
    return out;
  }
  case YAML::NodeType::Scalar: {
    const std::string &text = node.Scalar();
    if (node.Tag() == "!")
      return text; // quoted
    if (text == "true" || text == "True" || text == "TRUE")
      return true;
    if (text == "false" || text == "False" || text == "FALSE")
      return false;
    if (text == "null" || text == "~" || text == "Null" || text == "NULL")
      return nullptr;
    json number = json::parse(text, nullptr, false);
    if (!number.is_discarded() && number.is_number())
      return number;
    return text;
  }
  default:
    return nullptr;
  }
}

/// `status` with the line of the value its message names, for YAML files:
/// "r.yaml: passes[1].options.ratio: ..." becomes "r.yaml:7: passes[1]...".
Status withLine(Status status, const std::string &path, const std::map<std::string, int> &lines) {
  if (status.ok() || lines.empty())
    return status;
  const std::string &message = status.message();
  std::string best;
  for (const auto &[where, line] : lines)
    if (!where.empty() && where.size() > best.size() && message.find(" " + where) != std::string::npos)
      best = where;
  const std::string prefix = path + ": ";
  if (message.rfind(prefix, 0) != 0)
    return status;
  const int line = best.empty() ? 1 : lines.at(best);
  return Status::error(path, ":", line, ": ", message.substr(prefix.size()));
}

Expected<Recipe> parseRecipe(const std::string &path, json r);

} // namespace

Expected<Recipe> readRecipe(const std::string &path) {
  Expected<std::string> text = readWholeFile(path);
  if (!text)
    return text.status();
  const std::string extension = std::filesystem::path(path).extension().string();
  if (extension == ".yaml" || extension == ".yml") {
    std::map<std::string, int> lines;
    json r;
    try {
      r = yamlToJson(YAML::Load(*text), "", lines);
    } catch (const YAML::Exception &error) {
      return Status::error(path, ":", error.mark.line + 1, ":", error.mark.column + 1, ": not valid YAML: ", error.msg);
    }
    Expected<Recipe> recipe = parseRecipe(path, std::move(r));
    if (!recipe)
      return withLine(recipe.status(), path, lines);
    return recipe;
  }
  json r = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (r.is_discarded())
    return Status::error(path, ": not valid JSON (recipes are JSON, or YAML with a .yaml extension)");
  return parseRecipe(path, std::move(r));
}

Expected<Recipe> presetRecipe(const std::string &name) {
  for (const Preset &preset : presets())
    if (preset.name == name)
      return parseRecipe("preset '" + name + "'", json::parse(preset.recipe));
  std::vector<std::string> names;
  for (const Preset &preset : presets())
    names.push_back(preset.name);
  return Status::error("--preset '", name, "' is not a preset", didYouMean(name, names), " (", joinWords(names), ")");
}

namespace {

Expected<Recipe> parseRecipe(const std::string &path, json r) {
  if (!r.is_object())
    return Status::error(path, ": a recipe is an object with \"passes\" (and optionally \"calibration\")");
  for (const auto &[key, value] : r.items())
    if (key != "passes" && key != "calibration" && key != "description")
      return Status::error(path, ": unknown recipe key '", key, "' (expected passes, calibration, description)");
  if (!r.contains("passes") || !r["passes"].is_array() || r["passes"].empty())
    return Status::error(path, ": \"passes\" must be a non-empty array");
  Recipe recipe;
  recipe.path = path;
  const bool preset = path.rfind("preset ", 0) == 0;
  const std::string base = preset ? std::string() : std::filesystem::path(path).parent_path().string();
  if (r.contains("calibration")) {
    const json &c = r["calibration"];
    if (!c.is_object())
      return Status::error(path, ": \"calibration\" must be an object");
    for (const auto &[key, value] : c.items()) {
      if (key == "data" && value.is_string()) {
        std::filesystem::path data = value.get<std::string>();
        recipe.calibrationData = data.is_absolute() || base.empty() ? data.string() : (base / data).string();
      } else if (key == "tokens" && value.is_number_integer() && value.get<int64_t>() >= 0) {
        recipe.calibrationTokens = value.get<int64_t>();
      } else if (key == "seq_len" && value.is_number_integer() && value.get<int64_t>() > 0) {
        recipe.sequenceLength = value.get<int64_t>();
      } else if (key == "block_samples" && value.is_number_integer() && value.get<int64_t>() >= 0) {
        recipe.blockSamples = value.get<int64_t>();
      } else if (key == "sample_cap_ratio" && value.is_number() && std::isfinite(value.get<double>()) &&
                 value.get<double>() >= 0) {
        recipe.sampleCapRatio = value.get<double>();
      } else if (key == "moments" && value.is_string() && (value == "f64" || value == "f32")) {
        recipe.floatMoments = value == "f32";
      } else {
        return Status::error(
            path, ": calibration.", key, ": calibration option '", key,
            "' is unknown or has the wrong type (data: path, tokens: int >= 0, seq_len: int > 0, "
            "block_samples: int >= 0, sample_cap_ratio: number >= 0, moments: \"f64\" or \"f32\"), got ",
            value.dump());
      }
    }
  }
  for (size_t i = 0; i < r["passes"].size(); ++i) {
    const json &entry = r["passes"][i];
    const std::string where = concat("passes[", i, "]");
    if (!entry.is_object() || !entry.contains("pass") || !entry["pass"].is_string())
      return Status::error(path, ": ", where, " must be an object with a \"pass\" name (a string)");
    for (const auto &[key, value] : entry.items())
      if (key != "pass" && key != "options" && key != "tasks")
        return Status::error(path, ": ", where, " has unknown key '", key, "' (expected pass, options, tasks)");
    RecipePass pass;
    pass.name = entry["pass"].get<std::string>();
    pass.jsonPath = where;
    if (entry.contains("tasks")) {
      const json &tasks = entry["tasks"];
      if (pass.name != "moe-prune-experts")
        return Status::error(path, ": ", where, ".tasks: only moe-prune-experts makes task expert sets, not ",
                             pass.name);
      if (!tasks.is_array() || tasks.empty())
        return Status::error(path, ": ", where,
                             ".tasks must be a non-empty array of {\"name\": string, \"data\": path}");
      for (size_t t = 0; t < tasks.size(); ++t) {
        const json &task = tasks[t];
        const std::string at = concat(where, ".tasks[", t, "]");
        if (!task.is_object() || task.size() != 2 || !task.contains("name") || !task["name"].is_string() ||
            !task.contains("data") || !task["data"].is_string())
          return Status::error(path, ": ", at, " must be {\"name\": string, \"data\": path}, got ", task.dump());
        const std::string name = task["name"].get<std::string>();
        const bool plain = !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
          return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_' || c == '.';
        });
        if (!plain || name == "auto" || name == "all")
          return Status::error(path, ": ", at, ".name: '", name,
                               "' must be letters, digits, '-', '_' or '.', and not auto or all");
        for (const auto &[other, data] : pass.tasks)
          if (other == name)
            return Status::error(path, ": ", at, ".name: '", name, "' is given twice");
        std::filesystem::path data = task["data"].get<std::string>();
        pass.tasks.emplace_back(name, data.is_absolute() || base.empty() ? data.string() : (base / data).string());
      }
    }
    pass.options = entry.contains("options") ? entry["options"] : json::object();
    if (!pass.options.is_object())
      return Status::error(path, ": ", where, ".options must be an object");
    // Built once here, so that every option is checked before any work.
    Expected<std::unique_ptr<mlir::Pass>> checked = build(path, pass, PassOverrides{"<statistics>", {}, {}});
    if (!checked)
      return checked.status();
    if (pass.name == "moe-allocate-bits" && pass.options.value("objective", json("")) == json("hessian"))
      recipe.inputMoments = true; // the Hessian objective reads the (large) input moments
    if (pass.name == "moe-factor-experts" && pass.options.value("whiten", json(true)) != json(false))
      recipe.inputMoments = true; // the whitened SVD reads each expert's input and intermediate moments
    if (pass.name == "moe-prune-atoms" && pass.options.value("method", json("")) == json("heapr"))
      recipe.gradients = true; // HEAPr's Fisher term needs the backward pass
    if (pass.sequentialGptq && pass.options.contains("layers"))
      return Status::error(path, ": ", where,
                           ": moec compress runs GPTQ layer by layer itself; "
                           "drop the \"layers\" option");
    // Task sets are router rows of the model after their pass: a later pass
    // that removes, merges or renumbers experts would make them point at
    // other experts, and a larger top-k could exceed what a set keeps.
    for (const RecipePass &earlier : recipe.passes)
      if (!earlier.tasks.empty() && (pass.name == "moe-prune-experts" || pass.name == "moe-merge-experts" ||
                                     pass.name == "moe-drop-experts" || pass.name == "moe-set-topk"))
        return Status::error(path, ": ", where, ": ", pass.name, " may not follow ", earlier.jsonPath,
                             " (task expert sets): it would change the experts the sets name; put it before");
    recipe.passes.push_back(std::move(pass));
  }
  return recipe;
}

} // namespace

Expected<std::unique_ptr<mlir::Pass>> buildRecipePass(const Recipe &recipe, const RecipePass &pass,
                                                      const PassOverrides &overrides) {
  RecipePass copy = pass;
  return build(recipe.path, copy, overrides);
}

std::string describeRecipePass(const RecipePass &pass) {
  std::string text = pass.name + "{";
  bool first = true;
  for (const auto &[key, value] : pass.options.items()) {
    text += (first ? "" : " ") + key + "=" + (value.is_string() ? value.get<std::string>() : value.dump());
    first = false;
  }
  return text + "}";
}

} // namespace moe
