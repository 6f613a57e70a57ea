//===- Validate.cpp - A model description checked against its spec --------===//
//
// Part of moec. The one check between a description (from a package or a
// lowered module) and the engine: the engine indexes buffers by the spec's
// sizes and trusts every tensor to have them.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Safetensors.h"
#include "moe/Runtime/Description.h"

#include <cmath>
#include <map>
#include <set>

namespace moe {

namespace {

bool isRoutedExpertRole(TensorRole role) {
  return role == TensorRole::ExpertGate || role == TensorRole::ExpertUp || role == TensorRole::ExpertDown ||
         role == TensorRole::ExpertGateUpFused || role == TensorRole::ExpertDownFused;
}

std::string layerName(int64_t layer) { return layer < 0 ? std::string("the model") : concat("layer ", layer); }

class Validator {
public:
  Validator(const ModelDescription &description, std::string where)
      : description(description), spec(description.spec), where(std::move(where)) {}

  Status run() {
    if (static_cast<int64_t>(description.layers.size()) != spec.numLayers ||
        static_cast<int64_t>(spec.layers.size()) != spec.numLayers)
      return fail("has ", description.layers.size(), " layers; its config has num_hidden_layers = ", spec.numLayers);
    // The config as written (before pruning changed per-layer counts):
    // expert ids refer to its experts.
    original = spec;
    if (!description.configText.empty()) {
      Expected<ModelSpec> parsed = ModelSpec::fromConfigText(description.configText, where + " (config)");
      if (!parsed)
        return parsed.status();
      original = parsed.take();
      if (original.numLayers != spec.numLayers || original.hiddenSize != spec.hiddenSize ||
          original.vocabSize != spec.vocabSize)
        return fail("its model description disagrees with its config on the layer count, hidden size or vocabulary");
    }
    for (const TensorSpec &tensor : spec.tensors())
      if (!isRoutedExpertRole(tensor.role))
        expected[{tensor.layer, tensor.role}] = tensor.shape;
    MOE_RETURN_IF_ERROR(checkRoles(-1, description.globals));
    for (int64_t l = 0; l < spec.numLayers; ++l) {
      const LayerEntry &layer = description.layers[static_cast<size_t>(l)];
      MOE_RETURN_IF_ERROR(checkRoles(l, layer.tensors));
      MOE_RETURN_IF_ERROR(checkExperts(l, layer));
    }
    return validateTaskSets(description.taskSets, description, where);
  }

private:
  template <typename... Args> Status fail(const Args &...args) { return Status::error(where, ": ", args...); }

  /// Every non-expert tensor of `layer` (-1: model-level): a role the
  /// spec expects there, once, with the spec's shape; none missing.
  Status checkRoles(int64_t layer, const std::vector<std::pair<TensorRole, TensorRef>> &tensors) {
    std::set<TensorRole> seen;
    for (const auto &[role, tensor] : tensors) {
      if (isRoutedExpertRole(role))
        return fail(layerName(layer), ": tensor '", tensor.name, "' has routed-expert role ", tensorRoleName(role),
                    " outside the expert table");
      if (!seen.insert(role).second)
        return fail(layerName(layer), " has two ", tensorRoleName(role), " tensors (the second is '", tensor.name,
                    "')");
      if (role == TensorRole::Router || role == TensorRole::RouterCorrectionBias)
        continue; // sized by the experts the layer keeps: checkExperts
      auto it = expected.find({layer, role});
      if (it == expected.end())
        return fail(layerName(layer), ": tensor '", tensor.name, "' has role ", tensorRoleName(role), ", which a ",
                    spec.architecture, " ", layer < 0 ? "model" : "layer of this config", " does not have");
      if (tensor.shape != it->second)
        return fail(layerName(layer), ": tensor '", tensor.name, "' (", tensorRoleName(role), ") has shape ",
                    formatShape(tensor.shape), "; the config (hidden_size ", spec.hiddenSize, ", ",
                    spec.attention.numHeads, " heads of ", spec.attention.headDim, ") needs ", formatShape(it->second));
      if (!tensor.format.empty() && tensor.shape.size() != 2)
        return fail(layerName(layer), ": tensor '", tensor.name, "' is quantised but is not a matrix");
    }
    for (const auto &[key, shape] : expected)
      if (key.first == layer && !seen.count(key.second))
        return fail(layerName(layer), " has no ", tensorRoleName(key.second), " tensor; the config needs one of shape ",
                    formatShape(shape));
    return Status::success();
  }

  Status checkMatrix(int64_t layer, int64_t id, const TensorRef &tensor, const char *what, std::vector<int64_t> shape) {
    if (tensor.shape != shape)
      return fail(layerName(layer), id >= 0 ? " expert " + std::to_string(id) : std::string(" (experts' base)"),
                  ": its ", what, " tensor '", tensor.name, "' has shape ", formatShape(tensor.shape), "; expected ",
                  formatShape(shape));
    return Status::success();
  }

  Status checkExperts(int64_t l, const LayerEntry &layer) {
    const LayerSpec &layerSpec = spec.layers[static_cast<size_t>(l)];
    const int64_t H = spec.hiddenSize;
    const TensorRef *router = nullptr, *bias = nullptr;
    for (const auto &[role, tensor] : layer.tensors) {
      if (role == TensorRole::Router)
        router = &tensor;
      if (role == TensorRole::RouterCorrectionBias)
        bias = &tensor;
    }
    if (layerSpec.mlp == MlpKind::Dense) {
      if (!layer.experts.empty() || router || layer.expertBase)
        return fail(layerName(l), " is dense in the config but has routed experts, an experts' base or a router");
      return Status::success();
    }
    const int64_t slots = static_cast<int64_t>(layer.experts.size());
    if (slots == 0)
      return fail(layerName(l), " is an MoE layer with no routed experts");
    if (layerSpec.numExperts != slots)
      return fail(layerName(l), " declares ", layerSpec.numExperts, " experts and holds ", slots);
    const int64_t originalExperts = original.layers[static_cast<size_t>(l)].numExperts;
    std::set<int64_t> ids, origins;
    int64_t widest = 0;
    for (const ExpertEntry &expert : layer.experts) {
      if (expert.id < 0 || expert.id >= originalExperts)
        return fail(layerName(l), ": expert id ", expert.id, " is outside [0, ", originalExperts,
                    ") (the config's experts)");
      if (!ids.insert(expert.id).second)
        return fail(layerName(l), ": expert id ", expert.id, " appears twice");
      if (expert.origin < 0 || expert.origin >= originalExperts)
        return fail(layerName(l), ": expert ", expert.id, " has origin ", expert.origin, ", outside [0, ",
                    originalExperts, ") (the config's experts)");
      if (!origins.insert(expert.origin).second)
        return fail(layerName(l), ": origin ", expert.origin, " appears twice");
      int64_t firstWidth = expert.width;
      for (const ExpertPart &part : expert.moreParts) {
        if (part.width < 1)
          return fail(layerName(l), " expert ", expert.id, ": a part has width ", part.width);
        firstWidth -= part.width;
      }
      if (expert.width < 1 || firstWidth < 1)
        return fail(layerName(l), " expert ", expert.id, ": width ", expert.width, " (its first part ", firstWidth,
                    ") must be positive");
      if (layer.expertBase.has_value() != !expert.lowRank.empty())
        return fail(layerName(l), " expert ", expert.id,
                    layer.expertBase ? " is not factored, but the layer has a factored experts' base"
                                     : " has low-rank factors, but the layer has no experts' base");
      if (!expert.lowRank.empty()) {
        // Factored (moe-factor-experts): left factors [out, rank], right
        // factors [rank, in], a rank of at least 1 each.
        if (expert.lowRank.size() != 3 || !expert.moreParts.empty())
          return fail(layerName(l), " expert ", expert.id, ": a factored expert has three right factors and no parts");
        if (expert.width != layer.expertBase->width)
          return fail(layerName(l), " expert ", expert.id, ": width ", expert.width, ", its base's ",
                      layer.expertBase->width);
        const TensorRef *left[3] = {&expert.gate, &expert.up, &expert.down};
        const char *names[3] = {"gate", "up", "down"};
        const int64_t outs[3] = {firstWidth, firstWidth, H}, ins[3] = {H, H, firstWidth};
        for (int m = 0; m < 3; ++m) {
          const std::vector<int64_t> &shape = left[m]->shape;
          const int64_t rank = shape.size() == 2 ? shape[1] : 0;
          if (rank < 1 || rank > std::min(outs[m], ins[m]))
            return fail(layerName(l), " expert ", expert.id, ": the ", names[m], " left factor '", left[m]->name,
                        "' has shape ", formatShape(shape), "; expected [", outs[m],
                        ", rank] with 1 <= rank <= ", std::min(outs[m], ins[m]));
          MOE_RETURN_IF_ERROR(checkMatrix(l, expert.id, *left[m], names[m], {outs[m], rank}));
          MOE_RETURN_IF_ERROR(checkMatrix(l, expert.id, expert.lowRank[static_cast<size_t>(m)],
                                          (std::string(names[m]) + " right factor").c_str(), {rank, ins[m]}));
        }
        widest = std::max(widest, expert.width);
        continue;
      }
      MOE_RETURN_IF_ERROR(checkMatrix(l, expert.id, expert.gate, "gate", {firstWidth, H}));
      MOE_RETURN_IF_ERROR(checkMatrix(l, expert.id, expert.up, "up", {firstWidth, H}));
      MOE_RETURN_IF_ERROR(checkMatrix(l, expert.id, expert.down, "down", {H, firstWidth}));
      for (const ExpertPart &part : expert.moreParts) {
        MOE_RETURN_IF_ERROR(checkMatrix(l, expert.id, part.gate, "part gate", {part.width, H}));
        MOE_RETURN_IF_ERROR(checkMatrix(l, expert.id, part.up, "part up", {part.width, H}));
        MOE_RETURN_IF_ERROR(checkMatrix(l, expert.id, part.down, "part down", {H, part.width}));
      }
      widest = std::max(widest, expert.width);
    }
    if (layer.expertBase) {
      const int64_t W = layer.expertBase->width;
      if (W < 1)
        return fail(layerName(l), ": the experts' base has width ", W);
      MOE_RETURN_IF_ERROR(checkMatrix(l, -1, layer.expertBase->gate, "gate", {W, H}));
      MOE_RETURN_IF_ERROR(checkMatrix(l, -1, layer.expertBase->up, "up", {W, H}));
      MOE_RETURN_IF_ERROR(checkMatrix(l, -1, layer.expertBase->down, "down", {H, W}));
    }
    if (layerSpec.expertIntermediateSize < widest)
      return fail(layerName(l), " declares expert width ", layerSpec.expertIntermediateSize, " but an expert has ",
                  widest, " neurons");

    if (!router)
      return fail(layerName(l), " is an MoE layer with no router tensor");
    const RoutingPlan &routing = layer.routing;
    const int64_t rows = routing.remap.empty() ? slots : static_cast<int64_t>(routing.remap.size());
    if (router->shape != std::vector<int64_t>{rows, H})
      return fail(layerName(l), ": the router '", router->name, "' has shape ", formatShape(router->shape), "; ", rows,
                  routing.remap.empty() ? " experts" : " remap entries", " and hidden size ", H, " need [", rows, ", ",
                  H, "]");
    if (rows > originalExperts)
      return fail(layerName(l), ": the router has ", rows, " rows, more than the config's ", originalExperts,
                  " experts");
    for (int32_t slot : routing.remap)
      if (slot < 0 || slot >= slots)
        return fail(layerName(l), ": remap entry ", slot, " is not an expert slot [0, ", slots, ")");
    const RouterSpec &plan = routing.router ? *routing.router : spec.router;
    if (plan.topK < 1 || plan.topK > rows)
      return fail(layerName(l), ": top-k ", plan.topK, " must be between 1 and the router's ", rows, " rows");
    if (plan.scoring == RouterScoring::SparseMixer && plan.topK != 2)
      return fail(layerName(l), ": sparsemixer routing selects exactly 2 experts; top-k is ", plan.topK);
    if (plan.numGroups < 1 || plan.topKGroups < 1 || plan.topKGroups > plan.numGroups)
      return fail(layerName(l), ": ", plan.numGroups, " routing groups with ", plan.topKGroups,
                  " selected; expected 1 <= selected <= groups");
    if (plan.selection != ExpertSelection::TopK && rows % plan.numGroups != 0)
      return fail(layerName(l), ": ", rows, " router rows do not split into ", plan.numGroups, " groups");
    if (plan.selection == ExpertSelection::GroupLimitedTopTwoSum && rows / plan.numGroups < 2)
      return fail(layerName(l), ": group-top2-sum needs at least 2 experts a group");
    if (!std::isfinite(plan.scalingFactor) || !(plan.scalingFactor > 0))
      return fail(layerName(l), ": routed scaling ", plan.scalingFactor, " must be a positive finite number");
    if (plan.correctionBias != (bias != nullptr))
      return fail(layerName(l), ": the router ", plan.correctionBias ? "uses" : "does not use",
                  " a correction bias, and the layer ", bias ? "has" : "has no", " correction-bias tensor");
    if (bias && bias->shape != std::vector<int64_t>{rows})
      return fail(layerName(l), ": the correction bias '", bias->name, "' has shape ", formatShape(bias->shape),
                  "; the router's ", rows, " rows need [", rows, "]");
    if (!std::isfinite(routing.skipThreshold) || routing.skipThreshold < 0 || routing.skipThreshold > 1)
      return fail(layerName(l), ": skip threshold ", routing.skipThreshold, " must be in [0, 1]");
    return Status::success();
  }

  const ModelDescription &description;
  const ModelSpec &spec;
  ModelSpec original;
  std::string where;
  std::map<std::pair<int64_t, TensorRole>, std::vector<int64_t>> expected;
};

} // namespace

Status validateDescription(const ModelDescription &description, const std::string &where) {
  return Validator(description, where).run();
}

} // namespace moe
