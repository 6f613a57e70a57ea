//===- DescriptionSummary.cpp - What a compiled model holds ---------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/DescriptionSummary.h"

#include <algorithm>
#include <cctype>

namespace moe {

using json = nlohmann::json;

Expected<json> summarizeDescription(const ModelDescription &description) {
  TensorReader reader(description);
  json byRole = json::object(), byFormat = json::object();
  uint64_t total = 0;
  // Stored bytes and format name of one tensor, added to the totals.
  auto account = [&](const TensorRef &ref, TensorRole role, std::string &format) -> Expected<uint64_t> {
    DType dtype;
    uint64_t bytes = 0;
    MOE_RETURN_IF_ERROR(reader.size(ref, dtype, bytes));
    format = ref.format;
    if (format.empty()) {
      format = std::string(dtypeName(dtype));
      std::transform(format.begin(), format.end(), format.begin(), [](unsigned char c) { return std::tolower(c); });
    }
    const std::string group(roleGroupName(roleGroup(role)));
    byRole[group] = byRole.value(group, uint64_t(0)) + bytes;
    byFormat[format] = byFormat.value(format, uint64_t(0)) + bytes;
    total += bytes;
    return bytes;
  };
  std::string format;
  for (const auto &[role, ref] : description.globals) {
    Expected<uint64_t> bytes = account(ref, role, format);
    if (!bytes)
      return bytes.status();
  }
  json layers = json::array();
  for (size_t l = 0; l < description.layers.size(); ++l) {
    const LayerEntry &layer = description.layers[l];
    const LayerSpec &spec = description.spec.layers[l];
    json out = {{"index", l}, {"mlp", spec.mlp == MlpKind::Moe ? "moe" : "dense"}};
    uint64_t layerBytes = 0;
    for (const auto &[role, ref] : layer.tensors) {
      Expected<uint64_t> bytes = account(ref, role, format);
      if (!bytes)
        return bytes.status();
      layerBytes += *bytes;
    }
    if (spec.mlp == MlpKind::Moe) {
      const RouterSpec &router = layer.routing.router ? *layer.routing.router : description.spec.router;
      out["top_k"] = router.topK;
      out["router_rows"] = layer.routing.remap.empty() ? layer.experts.size() : layer.routing.remap.size();
      if (!layer.routing.remap.empty())
        out["remap"] = layer.routing.remap;
      if (layer.routing.skipThreshold > 0)
        out["skip_threshold"] = layer.routing.skipThreshold;
      json experts = json::array();
      for (const ExpertEntry &expert : layer.experts) {
        json formats = json::array();
        uint64_t expertBytes = 0;
        std::vector<std::pair<const TensorRef *, TensorRole>> parts = {{&expert.gate, TensorRole::ExpertGate},
                                                                       {&expert.up, TensorRole::ExpertUp},
                                                                       {&expert.down, TensorRole::ExpertDown}};
        for (const ExpertPart &part : expert.moreParts)
          for (const auto &pair :
               std::vector<std::pair<const TensorRef *, TensorRole>>{{&part.gate, TensorRole::ExpertGate},
                                                                     {&part.up, TensorRole::ExpertUp},
                                                                     {&part.down, TensorRole::ExpertDown}})
            parts.push_back(pair);
        if (!expert.lowRank.empty())
          parts.insert(parts.end(), {{&expert.lowRank[0], TensorRole::ExpertGate},
                                     {&expert.lowRank[1], TensorRole::ExpertUp},
                                     {&expert.lowRank[2], TensorRole::ExpertDown}});
        for (const auto &[ref, role] : parts) {
          Expected<uint64_t> bytes = account(*ref, role, format);
          if (!bytes)
            return bytes.status();
          expertBytes += *bytes;
          formats.push_back(format);
        }
        json record = {{"id", expert.id},       {"origin", expert.origin},
                       {"width", expert.width}, {"parts", 1 + expert.moreParts.size()},
                       {"formats", formats},    {"bytes", expertBytes}};
        if (!expert.lowRank.empty())
          record["ranks"] = {expert.gate.shape.at(1), expert.up.shape.at(1), expert.down.shape.at(1)};
        experts.push_back(std::move(record));
        layerBytes += expertBytes;
      }
      out["experts"] = experts;
      if (layer.expertBase) {
        // The factored experts' base: stored once for the layer.
        uint64_t baseBytes = 0;
        json formats = json::array();
        for (const auto &[ref, role] : {std::pair{&layer.expertBase->gate, TensorRole::ExpertGate},
                                        std::pair{&layer.expertBase->up, TensorRole::ExpertUp},
                                        std::pair{&layer.expertBase->down, TensorRole::ExpertDown}}) {
          Expected<uint64_t> bytes = account(*ref, role, format);
          if (!bytes)
            return bytes.status();
          baseBytes += *bytes;
          formats.push_back(format);
        }
        out["expert_base"] = {{"width", layer.expertBase->width}, {"formats", formats}, {"bytes", baseBytes}};
        layerBytes += baseBytes;
      }
    }
    out["bytes"] = layerBytes;
    layers.push_back(out);
  }
  json out = {{"family", std::string(familyName(description.spec.family))},
              {"hidden", description.spec.hiddenSize},
              {"layers", layers},
              {"bytes_by_role", byRole},
              {"bytes_by_format", byFormat},
              {"bytes", total}};
  // Task sets: per set the experts it keeps in each MoE layer.
  for (const TaskExpertSet &set : description.taskSets) {
    json kept = json::array();
    for (size_t l = 0; l < description.layers.size(); ++l) {
      if (description.spec.layers[l].mlp != MlpKind::Moe)
        continue;
      auto masked = set.masked.find(static_cast<int64_t>(l));
      const size_t off = masked == set.masked.end() ? 0 : masked->second.size();
      kept.push_back({{"layer", l}, {"experts", description.layers[l].experts.size() - off}});
    }
    out["task_sets"].push_back({{"name", set.name}, {"tokens", set.tokens}, {"kept", kept}});
  }
  return out;
}

} // namespace moe
