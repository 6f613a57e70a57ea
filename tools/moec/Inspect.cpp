//===- Inspect.cpp - moec inspect: what a checkpoint holds ----------------===//
//
// Part of moec. Prints the family, layer kinds, experts, router, parameters
// and bytes per role, total and active parameters per token, dtypes and
// shards of a checkpoint (or of a config.json alone with --config-only).
//
//===----------------------------------------------------------------------===//

#include "Commands.h"
#include "moe/Support/ByteSize.h"

#include "ModuleFiles.h"
#include "moe/Frontend/Checkpoint.h"
#include "moe/Frontend/ModelSpec.h"
#include "moe/Frontend/ModelSummary.h"
#include "moe/Lowering/Lowering.h"
#include "moe/Runtime/DescriptionSummary.h"
#include "moe/Runtime/GgufModel.h"
#include "moe/Runtime/Package.h"

#include "mlir/IR/MLIRContext.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <sys/stat.h>

namespace moe::cli {
namespace {

using json = nlohmann::json;

struct InspectOptions {
  std::string path;
  bool json = false;
  bool configOnly = false;
};

/// "0-3, 5, 7-9" for sorted indices.
std::string formatRanges(const std::vector<int64_t> &indices) {
  std::string text;
  for (size_t i = 0; i < indices.size();) {
    size_t j = i;
    while (j + 1 < indices.size() && indices[j + 1] == indices[j] + 1)
      ++j;
    if (!text.empty())
      text += ", ";
    text += std::to_string(indices[i]);
    if (j > i)
      text += "-" + std::to_string(indices[j]);
    i = j + 1;
  }
  return text.empty() ? "none" : text;
}

/// 46702792704 -> "46.70B".
std::string formatCount(int64_t value) {
  char buffer[32];
  double v = static_cast<double>(value);
  if (v >= 1e9)
    std::snprintf(buffer, sizeof(buffer), "%.2fB", v / 1e9);
  else if (v >= 1e6)
    std::snprintf(buffer, sizeof(buffer), "%.2fM", v / 1e6);
  else if (v >= 1e3)
    std::snprintf(buffer, sizeof(buffer), "%.2fK", v / 1e3);
  else
    std::snprintf(buffer, sizeof(buffer), "%lld", static_cast<long long>(value));
  return buffer;
}

json layerJson(const LayerSpec &layer) {
  json out = {{"index", layer.index}, {"mlp", layer.mlp == MlpKind::Moe ? "moe" : "dense"}};
  if (layer.mlp == MlpKind::Dense) {
    out["intermediate_size"] = layer.denseIntermediateSize;
    return out;
  }
  out["experts"] = layer.numExperts;
  out["expert_intermediate_size"] = layer.expertIntermediateSize;
  out["shared_intermediate_size"] = layer.shared.intermediateSize;
  out["shared_gated"] = layer.shared.gated;
  out["expert_layout"] = expertLayoutName(layer.expertLayout);
  out["moe_prefix"] = layer.moePrefix;
  return out;
}

json specJson(const ModelSpec &spec) {
  const AttentionSpec &a = spec.attention;
  json attention = {{"kind", attentionKindName(a.kind)},
                    {"heads", a.numHeads},
                    {"kv_heads", a.numKeyValueHeads},
                    {"head_dim", a.headDim},
                    {"v_head_dim", a.valueHeadDim},
                    {"qkv_bias", a.qkvBias},
                    {"o_bias", a.outputBias},
                    {"qk_norm", qkNormKindName(a.qkNorm)},
                    {"clip_qkv", a.clipQkv},
                    {"softmax_scale", a.softmaxScale}};
  if (a.kind == AttentionKind::MultiHeadLatent) {
    attention["q_lora_rank"] = a.queryLoraRank;
    attention["kv_lora_rank"] = a.kvLoraRank;
    attention["qk_nope_head_dim"] = a.qkNopeHeadDim;
    attention["qk_rope_head_dim"] = a.qkRopeHeadDim;
  }
  const RopeSpec &r = spec.rope;
  json rope = {{"layout", ropeLayoutName(r.layout)},
               {"theta", r.theta},
               {"rotary_dim", r.rotaryDim},
               {"scaling", ropeScalingName(r.scaling)}};
  if (r.scaling != RopeScalingKind::None) {
    rope["factor"] = r.factor;
    rope["original_max_position_embeddings"] = r.originalMaxPositions;
  }
  if (r.scaling == RopeScalingKind::Yarn) {
    rope["beta_fast"] = r.betaFast;
    rope["beta_slow"] = r.betaSlow;
    rope["mscale"] = r.mscale;
    rope["mscale_all_dim"] = r.mscaleAllDim;
  }
  if (r.scaling == RopeScalingKind::LongRope) {
    rope["short_factor"] = r.shortFactor;
    rope["long_factor"] = r.longFactor;
    rope["short_mscale"] = r.shortMscale;
    rope["long_mscale"] = r.longMscale;
  }
  const RouterSpec &g = spec.router;
  json router = {{"scoring", routerScoringName(g.scoring)},
                 {"selection", expertSelectionName(g.selection)},
                 {"top_k", g.topK},
                 {"renormalize", g.normalizeTopK},
                 {"scaling_factor", g.scalingFactor},
                 {"groups", g.numGroups},
                 {"top_k_groups", g.topKGroups},
                 {"correction_bias", g.correctionBias}};
  if (g.scoring == RouterScoring::SparseMixer)
    router["jitter_eps"] = g.jitterEps;

  std::vector<int64_t> moeLayers, denseLayers;
  json layers = json::array();
  for (const LayerSpec &layer : spec.layers) {
    (layer.mlp == MlpKind::Moe ? moeLayers : denseLayers).push_back(layer.index);
    layers.push_back(layerJson(layer));
  }
  return {{"architecture", spec.architecture},
          {"family", familyName(spec.family)},
          {"model_type", spec.modelType},
          {"hidden_size", spec.hiddenSize},
          {"num_layers", spec.numLayers},
          {"vocab_size", spec.vocabSize},
          {"max_position_embeddings", spec.maxPositions},
          {"tie_word_embeddings", spec.tieWordEmbeddings},
          {"lm_head_bias", spec.lmHeadBias},
          {"config_dtype", dtypeName(spec.configDType)},
          {"fp8_block_scaled", spec.fp8BlockScaled},
          {"mtp_layers", spec.numMtpLayers},
          {"norm", {{"kind", normKindName(spec.normKind)}, {"eps", spec.normEps}}},
          {"attention", attention},
          {"rope", rope},
          {"router", router},
          {"moe_layers", moeLayers},
          {"dense_layers", denseLayers},
          {"layers", layers}};
}

json summaryJson(const ModelSummary &summary) {
  json roles = json::object();
  for (int g = 0; g < kNumRoleGroups; ++g) {
    const SizeCount &count = summary.groups[g];
    if (count.tensors == 0)
      continue;
    roles[std::string(roleGroupName(static_cast<RoleGroup>(g)))] = {
        {"parameters", count.parameters}, {"bytes", count.bytes}, {"tensors", count.tensors}};
  }
  json dtypes = json::object();
  for (const auto &[name, count] : summary.dtypes)
    dtypes[name] = {{"parameters", count.parameters}, {"bytes", count.bytes}, {"tensors", count.tensors}};
  return {{"total_parameters", summary.totalParameters},
          {"active_parameters", summary.activeParameters},
          {"total_bytes", summary.totalBytes},
          {"by_role", roles},
          {"dtypes", dtypes}};
}

void printText(const ModelSpec &spec, const ModelSummary &summary, const std::string &path,
               const Checkpoint *checkpoint, const CheckpointReport *report) {
  std::vector<int64_t> moeLayers, denseLayers;
  for (const LayerSpec &layer : spec.layers)
    (layer.mlp == MlpKind::Moe ? moeLayers : denseLayers).push_back(layer.index);
  const AttentionSpec &a = spec.attention;
  const RouterSpec &g = spec.router;
  std::printf("model:       %s\n", path.c_str());
  std::printf("family:      %s (%s)%s\n", std::string(familyName(spec.family)).c_str(), spec.architecture.c_str(),
              checkpoint ? "" : "  [config only]");
  std::printf("layers:      %lld: MoE %s; dense %s\n", static_cast<long long>(spec.numLayers),
              formatRanges(moeLayers).c_str(), formatRanges(denseLayers).c_str());
  std::printf("dims:        hidden %lld, vocab %lld, max positions %lld%s\n", static_cast<long long>(spec.hiddenSize),
              static_cast<long long>(spec.vocabSize), static_cast<long long>(spec.maxPositions),
              spec.tieWordEmbeddings ? ", tied embeddings" : "");
  std::printf("norm:        %s, eps %g\n", std::string(normKindName(spec.normKind)).c_str(), spec.normEps);
  if (a.kind == AttentionKind::GroupedQuery)
    std::printf("attention:   gqa, %lld heads / %lld kv heads, head dim %lld, qk-norm %s%s%s\n",
                static_cast<long long>(a.numHeads), static_cast<long long>(a.numKeyValueHeads),
                static_cast<long long>(a.headDim), std::string(qkNormKindName(a.qkNorm)).c_str(),
                a.qkvBias ? ", qkv bias" : "", a.outputBias ? ", o bias" : "");
  else
    std::printf("attention:   mla, %lld heads, q lora %s, kv lora %lld, nope/rope/v dims %lld/%lld/%lld, "
                "softmax scale %.6g\n",
                static_cast<long long>(a.numHeads), a.queryLoraRank ? std::to_string(a.queryLoraRank).c_str() : "none",
                static_cast<long long>(a.kvLoraRank), static_cast<long long>(a.qkNopeHeadDim),
                static_cast<long long>(a.qkRopeHeadDim), static_cast<long long>(a.valueHeadDim), a.softmaxScale);
  std::printf("rope:        %s, theta %g, scaling %s", std::string(ropeLayoutName(spec.rope.layout)).c_str(),
              spec.rope.theta, std::string(ropeScalingName(spec.rope.scaling)).c_str());
  if (spec.rope.scaling != RopeScalingKind::None && spec.rope.scaling != RopeScalingKind::LongRope)
    std::printf(" (factor %g)", spec.rope.factor);
  std::printf("\n");
  if (!moeLayers.empty()) {
    const LayerSpec &first = spec.layers[static_cast<size_t>(moeLayers.front())];
    std::printf("experts:     %lld routed, top-%lld, width %lld", static_cast<long long>(first.numExperts),
                static_cast<long long>(g.topK), static_cast<long long>(first.expertIntermediateSize));
    if (first.shared.intermediateSize > 0)
      std::printf("; shared width %lld (%s)", static_cast<long long>(first.shared.intermediateSize),
                  first.shared.gated ? "gated" : "ungated");
    else
      std::printf("; no shared expert");
    std::printf("; stored %s under '%s'\n", std::string(expertLayoutName(first.expertLayout)).c_str(),
                first.moePrefix.c_str());
    std::printf("router:      %s, %s", std::string(routerScoringName(g.scoring)).c_str(),
                std::string(expertSelectionName(g.selection)).c_str());
    if (g.selection != ExpertSelection::TopK)
      std::printf(" (%lld of %lld groups)", static_cast<long long>(g.topKGroups), static_cast<long long>(g.numGroups));
    std::printf(", renormalize %s, scaling %g%s\n", g.normalizeTopK ? "yes" : "no", g.scalingFactor,
                g.correctionBias ? ", correction bias" : "");
  }
  std::printf("parameters:  %s total, %s active per token (%lld / %lld)\n",
              formatCount(summary.totalParameters).c_str(), formatCount(summary.activeParameters).c_str(),
              static_cast<long long>(summary.totalParameters), static_cast<long long>(summary.activeParameters));
  std::printf("size:        %s%s\n", formatBytes(summary.totalBytes).c_str(),
              checkpoint ? "" : " (from the config dtype)");
  std::printf("\n  %-16s %14s %12s %8s\n", "role", "parameters", "bytes", "tensors");
  for (int i = 0; i < kNumRoleGroups; ++i) {
    const SizeCount &count = summary.groups[i];
    if (count.tensors == 0)
      continue;
    std::printf("  %-16s %14s %12s %8lld\n", std::string(roleGroupName(static_cast<RoleGroup>(i))).c_str(),
                formatCount(count.parameters).c_str(), formatBytes(count.bytes).c_str(),
                static_cast<long long>(count.tensors));
  }
  std::printf("\n  %-16s %14s %12s %8s\n", "dtype", "parameters", "bytes", "tensors");
  for (const auto &[name, count] : summary.dtypes)
    std::printf("  %-16s %14s %12s %8lld\n", name.c_str(), formatCount(count.parameters).c_str(),
                formatBytes(count.bytes).c_str(), static_cast<long long>(count.tensors));
  if (checkpoint) {
    std::printf("\n  %-40s %8s %12s\n", "shard", "tensors", "bytes");
    for (const auto &shard : checkpoint->shards()) {
      std::string name = shard->path().substr(shard->path().find_last_of('/') + 1);
      std::printf("  %-40s %8zu %12s\n", name.c_str(), shard->tensors().size(),
                  formatBytes(static_cast<int64_t>(shard->fileSize())).c_str());
    }
  }
  if (report && !report->ignoredTensors.empty())
    std::printf("\nignored:     %zu multi-token-prediction tensors\n", report->ignoredTensors.size());
}

bool isDirectory(const std::string &path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

bool endsWith(const std::string &text, const char *suffix) {
  const size_t n = std::strlen(suffix);
  return text.size() >= n && text.compare(text.size() - n, n, suffix) == 0;
}

/// A module, package or GGUF file moec wrote: what the runtime would run.
int runInspectCompiled(const InspectOptions &options) {
  Expected<CompiledModel> compiled = readCompiledModel(options.path);
  if (!compiled) {
    printError(compiled.status().message());
    return 1;
  }
  Expected<json> summary = summarizeDescription(compiled->description);
  if (!summary) {
    printError(options.path + ": " + summary.status().message());
    return 1;
  }
  (*summary)["path"] = options.path;
  (*summary)["kind"] = compiled->kind;
  if (!compiled->provenance.is_null())
    (*summary)["provenance"] = compiled->provenance;
  if (options.json) {
    std::cout << summary->dump(2) << "\n";
    return 0;
  }
  const json &s = *summary;
  std::printf("%s: %s of a %s model, %zu layers, %s\n", options.path.c_str(), compiled->kind.c_str(),
              s["family"].get<std::string>().c_str(), s["layers"].size(),
              formatBytes(static_cast<int64_t>(s["bytes"].get<uint64_t>())).c_str());
  std::printf("bytes by role:");
  for (const auto &[role, bytes] : s["bytes_by_role"].items())
    std::printf("  %s %s", role.c_str(), formatBytes(bytes.get<int64_t>()).c_str());
  std::printf("\nbytes by format:");
  for (const auto &[format, bytes] : s["bytes_by_format"].items())
    std::printf("  %s %s", format.c_str(), formatBytes(bytes.get<int64_t>()).c_str());
  std::printf("\n%-6s %-8s %-8s %-22s %-28s %s\n", "layer", "mlp", "experts", "widths", "formats", "routing");
  for (const json &layer : s["layers"]) {
    if (layer["mlp"] != "moe") {
      std::printf("%-6d %-8s\n", layer["index"].get<int>(), "dense");
      continue;
    }
    std::map<int64_t, int> widths;
    std::map<std::string, int> formats;
    for (const json &expert : layer["experts"]) {
      ++widths[expert["width"].get<int64_t>()];
      for (const json &format : expert["formats"])
        ++formats[format.get<std::string>()];
    }
    std::string widthText, formatText;
    for (const auto &[width, count] : widths)
      widthText += (widthText.empty() ? "" : " ") + std::to_string(width) + "x" + std::to_string(count);
    for (const auto &[format, count] : formats)
      formatText += (formatText.empty() ? "" : " ") + format + "x" + std::to_string(count);
    std::string routing = "top-" + std::to_string(layer["top_k"].get<int64_t>());
    if (layer.contains("remap"))
      routing += ", " + std::to_string(layer["router_rows"].get<int64_t>()) + " rows onto " +
                 std::to_string(layer["experts"].size()) + " merged experts";
    if (layer.contains("skip_threshold"))
      routing += ", skip below " + std::to_string(layer["skip_threshold"].get<double>());
    if (layer.contains("expert_base")) {
      // Factored experts: the shared base and the deltas' ranks.
      int64_t lowest = -1, highest = 0;
      for (const json &expert : layer["experts"])
        for (const json &rank : expert.value("ranks", json::array())) {
          lowest = lowest < 0 ? rank.get<int64_t>() : std::min(lowest, rank.get<int64_t>());
          highest = std::max(highest, rank.get<int64_t>());
        }
      routing += ", factored: base " + formatBytes(layer["expert_base"]["bytes"].get<int64_t>()) +
                 " + deltas of rank " + std::to_string(lowest) + "-" + std::to_string(highest);
    }
    std::printf("%-6d %-8s %-8zu %-22s %-28s %s\n", layer["index"].get<int>(), "moe", layer["experts"].size(),
                widthText.c_str(), formatText.c_str(), routing.c_str());
  }
  if (s.contains("task_sets")) {
    std::printf("task sets (experts kept per MoE layer; moec eval/generate --task NAME|auto|all):\n");
    for (const json &set : s["task_sets"]) {
      std::string kept;
      for (const json &layer : set["kept"])
        kept += (kept.empty() ? "" : " ") + std::to_string(layer["layer"].get<int64_t>()) + ":" +
                std::to_string(layer["experts"].get<int64_t>());
      std::printf("  %-16s %s (calibrated on %lld tokens)\n", set["name"].get<std::string>().c_str(), kept.c_str(),
                  static_cast<long long>(set["tokens"].get<int64_t>()));
    }
  }
  if (s.contains("provenance") && s["provenance"].is_object()) {
    json shown = s["provenance"];
    shown.erase("original"); // the history is `moec report`'s to show
    shown.erase("decisions");
    std::printf("provenance: %s\n", shown.dump().c_str());
  }
  const json &decisions = compiled->history.is_object() ? compiled->history["decisions"] : json();
  if (decisions.is_array() && !decisions.empty()) {
    std::map<std::string, int> passes;
    for (const json &d : decisions)
      ++passes[d.value("pass", "?") + "{method=" + d.value("method", "?") + "}"];
    std::string text;
    for (const auto &[pass, layers] : passes)
      text += (text.empty() ? "" : ", ") + pass + " on " + std::to_string(layers) + " layers";
    std::printf("decisions: %s (moec report shows each expert's)\n", text.c_str());
  }
  return 0;
}

int runInspect(const InspectOptions &options) {
  if (!options.configOnly &&
      (isPackagePath(options.path) || isGgufPath(options.path) || endsWith(options.path, ".mlir")))
    return runInspectCompiled(options);
  std::unique_ptr<Checkpoint> checkpoint;
  std::string configPath = options.path;
  if (isDirectory(options.path)) {
    configPath = options.path + "/config.json";
  } else if (!options.configOnly) {
    printError(options.path + ": not a directory (expected a checkpoint directory; "
                              "use --config-only to inspect a config.json alone)");
    return 1;
  }
  Expected<ModelSpec> spec = ModelSpec::fromConfigFile(configPath);
  if (!spec) {
    printError(spec.status().message());
    return 1;
  }
  CheckpointReport report;
  ModelSummary summary;
  if (options.configOnly) {
    summary = summarizeFromConfig(*spec);
  } else {
    Expected<std::unique_ptr<Checkpoint>> opened = Checkpoint::open(options.path);
    if (!opened) {
      printError(opened.status().message());
      return 1;
    }
    checkpoint = opened.take();
    Expected<CheckpointReport> bound = bindCheckpoint(*spec, *checkpoint);
    if (!bound) {
      printError(bound.status().message());
      return 1;
    }
    report = bound.take();
    summary = summarizeCheckpoint(*spec, *checkpoint);
  }
  for (const std::string &warning : report.warnings)
    printWarning(warning);

  if (!options.json) {
    printText(*spec, summary, options.path, checkpoint.get(), &report);
    return 0;
  }
  json out = specJson(*spec);
  out["path"] = options.path;
  out["config_only"] = options.configOnly;
  out["parameters"] = summaryJson(summary);
  if (checkpoint) {
    json shards = json::array();
    for (const auto &shard : checkpoint->shards())
      shards.push_back({{"file", shard->path().substr(shard->path().find_last_of('/') + 1)},
                        {"tensors", shard->tensors().size()},
                        {"bytes", shard->fileSize()}});
    out["shards"] = shards;
    out["sharded"] = checkpoint->isSharded();
    out["ignored_tensors"] = report.ignoredTensors.size();
  }
  out["warnings"] = report.warnings;
  std::cout << out.dump(2) << "\n";
  return 0;
}

} // namespace

Command registerInspect(CLI::App &app) {
  auto options = std::make_shared<InspectOptions>();
  CLI::App *command = app.add_subcommand("inspect", "Describe a checkpoint: family, layers, experts, router, "
                                                    "parameters and bytes per role, dtypes, shards");
  command
      ->add_option("path", options->path,
                   "Checkpoint directory (or config.json with --config-only), module (.mlir), package (.moepkg) "
                   "or GGUF file moec wrote")
      ->required();
  command->add_flag("--json", options->json, "Print JSON for machines");
  command->add_flag("--config-only", options->configOnly,
                    "Compute everything from config.json alone (no weights needed)");
  return {command, [options] { return runInspect(*options); }};
}

} // namespace moe::cli
