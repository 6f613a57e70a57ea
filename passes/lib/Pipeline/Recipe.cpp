//===- Recipe.cpp - Compression recipes, built into passes structurally ---===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Pipeline/Recipe.h"
#include "common/GgmlFormats.h"
#include "moe/Support/File.h"
#include "moe/Transforms/Passes.h"

#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <set>

namespace moe {

using json = nlohmann::json;

namespace {

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
        std::string names;
        for (const std::string &name : asked)
          names += (names.empty() ? "" : ", ") + name;
        return Status::error(where, ".", key, ": ", passName, " has no such option (it has: ", names, ")");
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
         read.real("min-coverage", o.minCoverage);
         read.integer("bits", o.bits);
         read.integer("group", o.group);
         read.flag("sym", o.symmetric);
         read.choice("scale-type", o.scaleType);
         read.choice("format", o.format);
         read.choices("targets", targets);
         o.targets = targets;
         read.integers("layers", layers);
         meta.sequentialGptq = meta.needsStatistics = o.method == QuantizeMethod::Gptq;
         meta.minCoverage = o.minCoverage;
         meta.quantizesOutsideLayers = llvm::is_contained(targets, QuantizeTarget::LmHead) ||
                                       llvm::is_contained(targets, QuantizeTarget::Embedding);
         if (overrides.method)
           o.method = *overrides.method;
         setStats(read, o.method == QuantizeMethod::Gptq ? overrides : PassOverrides(), o.stats);
         if (overrides.layer)
           layers = {*overrides.layer};
         o.layers = layers;
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

Expected<std::unique_ptr<mlir::Pass>> build(const std::string &recipePath, RecipePass &pass,
                                            const PassOverrides &overrides) {
  auto builder = passBuilders().find(pass.name);
  if (builder == passBuilders().end()) {
    std::string names;
    for (const auto &[name, unused] : passBuilders())
      names += (names.empty() ? "" : ", ") + name;
    return Status::error(recipePath, ": ", pass.jsonPath, ".pass: '", pass.name, "' is not a moec pass (", names, ")");
  }
  OptionReader reader(pass.options, recipePath + ": " + pass.jsonPath + ".options");
  std::unique_ptr<mlir::Pass> built = builder->second(reader, overrides, pass);
  MOE_RETURN_IF_ERROR(reader.finish(pass.name));
  return built;
}

} // namespace

Expected<Recipe> readRecipe(const std::string &path) {
  Expected<std::string> text = readWholeFile(path);
  if (!text)
    return text.status();
  json r = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (r.is_discarded() || !r.is_object())
    return Status::error(path, ": a recipe is a JSON object with \"passes\" (and optionally \"calibration\")");
  for (const auto &[key, value] : r.items())
    if (key != "passes" && key != "calibration" && key != "description")
      return Status::error(path, ": unknown recipe key '", key, "' (expected passes, calibration, description)");
  if (!r.contains("passes") || !r["passes"].is_array() || r["passes"].empty())
    return Status::error(path, ": \"passes\" must be a non-empty array");
  Recipe recipe;
  recipe.path = path;
  const std::string base = std::filesystem::path(path).parent_path().string();
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
      } else {
        return Status::error(path, ": calibration.", key, ": calibration option '", key,
                             "' is unknown or has the wrong type (data: path, tokens: int >= 0, seq_len: int > 0, "
                             "block_samples: int >= 0, sample_cap_ratio: number >= 0), got ",
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
      if (key != "pass" && key != "options")
        return Status::error(path, ": ", where, " has unknown key '", key, "' (expected pass, options)");
    RecipePass pass;
    pass.name = entry["pass"].get<std::string>();
    pass.jsonPath = where;
    pass.options = entry.contains("options") ? entry["options"] : json::object();
    if (!pass.options.is_object())
      return Status::error(path, ": ", where, ".options must be an object");
    // Built once here, so that every option is checked before any work.
    Expected<std::unique_ptr<mlir::Pass>> checked = build(path, pass, PassOverrides{"<statistics>", {}, {}});
    if (!checked)
      return checked.status();
    if (pass.name == "moe-allocate-bits" && pass.options.value("objective", json("")) == json("hessian"))
      recipe.inputMoments = true; // the Hessian objective reads the (large) input moments
    if (pass.sequentialGptq && pass.options.contains("layers"))
      return Status::error(path, ": ", where,
                           ": moec compress runs GPTQ layer by layer itself; "
                           "drop the \"layers\" option");
    recipe.passes.push_back(std::move(pass));
  }
  return recipe;
}

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
