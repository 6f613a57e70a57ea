//===- TaskSets.cpp - Task-adaptive expert sets (PreMoe's retrieval) -------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/TaskSets.h"
#include "moe/Runtime/Description.h"

#include <cmath>
#include <limits>

namespace moe {

using json = nlohmann::json;

json taskSetsToJson(const std::vector<TaskExpertSet> &sets) {
  json out = json::array();
  for (const TaskExpertSet &set : sets) {
    json masked = json::object(), signatures = json::object();
    for (const auto &[layer, rows] : set.masked)
      masked[std::to_string(layer)] = std::vector<int64_t>(rows.begin(), rows.end());
    for (const auto &[layer, signature] : set.signatures)
      signatures[std::to_string(layer)] = signature;
    out.push_back({{"name", set.name}, {"signatures", signatures}, {"tokens", set.tokens}, {"masked", masked}});
  }
  return out;
}

Expected<std::vector<TaskExpertSet>> taskSetsFromJson(const json &value, const std::string &where) {
  if (!value.is_array())
    return Status::error(where, ": task_sets must be an array of task sets");
  std::vector<TaskExpertSet> sets;
  for (size_t i = 0; i < value.size(); ++i) {
    const json &entry = value[i];
    const std::string field = concat(where, ": task_sets[", i, "]");
    if (!entry.is_object() || !entry.contains("name") || !entry["name"].is_string() || !entry.contains("signatures") ||
        !entry["signatures"].is_object() || !entry.contains("tokens") || !entry["tokens"].is_number_integer() ||
        !entry.contains("masked") || !entry["masked"].is_object())
      return Status::error(field, ": expected {\"name\": string, \"signatures\": {\"<layer>\": [numbers]}, "
                                  "\"tokens\": int, \"masked\": {\"<layer>\": [rows]}}");
    TaskExpertSet set;
    set.name = entry["name"].get<std::string>();
    set.tokens = entry["tokens"].get<int64_t>();
    // {"<layer>": [values]} into `out`, each value checked by `accept`.
    auto byLayer = [&](const char *key, auto &out, auto accept) -> Status {
      for (const auto &[layerText, values] : entry[key].items()) {
        char *end = nullptr;
        const long long layer = std::strtoll(layerText.c_str(), &end, 10);
        if (layerText.empty() || *end != '\0' || !values.is_array())
          return Status::error(field, ".", key, ": expected layer numbers mapping to arrays, got \"", layerText, "\"");
        auto &target = out[layer];
        for (const json &value : values)
          if (!accept(value, target))
            return Status::error(field, ".", key, ".", layerText, ": unexpected entry ", value.dump());
      }
      return Status::success();
    };
    MOE_RETURN_IF_ERROR(byLayer("signatures", set.signatures, [](const json &value, std::vector<double> &target) {
      if (!value.is_number())
        return false;
      target.push_back(value.get<double>());
      return true;
    }));
    MOE_RETURN_IF_ERROR(byLayer("masked", set.masked, [](const json &value, std::set<int64_t> &target) {
      if (!value.is_number_integer())
        return false;
      target.insert(value.get<int64_t>());
      return true;
    }));
    sets.push_back(std::move(set));
  }
  return sets;
}

Status validateTaskSets(const std::vector<TaskExpertSet> &sets, const ModelDescription &description,
                        const std::string &where) {
  const ModelSpec &spec = description.spec;
  auto routerRows = [&](int64_t layer) -> int64_t {
    const LayerEntry &entry = description.layers[static_cast<size_t>(layer)];
    return entry.routing.remap.empty() ? static_cast<int64_t>(entry.experts.size())
                                       : static_cast<int64_t>(entry.routing.remap.size());
  };
  auto isMoe = [&](int64_t layer) {
    return layer >= 0 && layer < spec.numLayers && layer < static_cast<int64_t>(description.layers.size()) &&
           spec.layers[static_cast<size_t>(layer)].mlp == MlpKind::Moe;
  };
  std::set<std::string> names;
  for (const TaskExpertSet &set : sets) {
    const std::string field = concat(where, ": task set '", set.name, "'");
    if (set.name.empty() || set.name == "auto" || set.name == "all")
      return Status::error(where, ": a task set is named '", set.name,
                           "'; names must be non-empty and not auto or all (those are --task's choices)");
    if (!names.insert(set.name).second)
      return Status::error(where, ": two task sets are named '", set.name, "'");
    if (set.signatures.empty())
      return Status::error(field, ": no signature");
    for (const auto &[layer, signature] : set.signatures) {
      if (!isMoe(layer))
        return Status::error(field, ": signature layer ", layer, " is not a MoE layer");
      if (static_cast<int64_t>(signature.size()) != routerRows(layer))
        return Status::error(field, ": the signature of layer ", layer, " has ", signature.size(),
                             " entries; the layer has ", routerRows(layer), " router rows");
      for (double value : signature)
        if (!std::isfinite(value))
          return Status::error(field, ": the signature of layer ", layer, " has a non-finite entry");
      if (!sets.front().signatures.count(layer))
        return Status::error(field, ": has a signature of layer ", layer, ", task set '", sets.front().name,
                             "' does not; every set needs the same layers");
    }
    if (set.signatures.size() != sets.front().signatures.size())
      return Status::error(field, ": has signatures of ", set.signatures.size(), " layers, task set '",
                           sets.front().name, "' of ", sets.front().signatures.size());
    if (set.tokens < 0)
      return Status::error(field, ": tokens is negative");
    for (const auto &[layer, rows] : set.masked) {
      if (!isMoe(layer))
        return Status::error(field, ": masked layer ", layer, " is not a MoE layer");
      const LayerEntry &entry = description.layers[static_cast<size_t>(layer)];
      if (!entry.routing.remap.empty())
        return Status::error(field, ": layer ", layer,
                             " has merged experts (a remap table); task sets need router rows that are experts");
      const int64_t count = routerRows(layer);
      for (int64_t row : rows)
        if (row < 0 || row >= count)
          return Status::error(field, ": layer ", layer, " masks row ", row, "; the layer has ", count, " experts");
      const int64_t topK = entry.routing.router ? entry.routing.router->topK : spec.router.topK;
      if (count - static_cast<int64_t>(rows.size()) < topK)
        return Status::error(field, ": layer ", layer, " keeps ", count - static_cast<int64_t>(rows.size()),
                             " experts, fewer than its top-k ", topK);
    }
  }
  return Status::success();
}

Expected<const TaskExpertSet *> findTaskSet(const std::vector<TaskExpertSet> &sets, const std::string &name) {
  std::string names;
  for (const TaskExpertSet &set : sets) {
    if (set.name == name)
      return &set;
    names += (names.empty() ? "" : ", ") + set.name;
  }
  if (sets.empty())
    return Status::error("--task '", name,
                         "': the model carries no task sets (moec compress with \"tasks\" makes them)");
  return Status::error("--task '", name, "': no such task set; the model has ", names, " (or auto, all)");
}

namespace {

/// PreMoe's marker at some layers: per token the top-1 row's raw logit.
class SignatureRecorder : public EngineObserver {
public:
  SignatureRecorder(const std::set<int64_t> &layers, std::map<int64_t, std::vector<double>> &sums,
                    std::map<int64_t, int64_t> &tokens)
      : layers(layers), sums(sums), tokens(tokens) {}
  void onRouter(int64_t at, int64_t count, std::span<const float> logits, std::span<const int32_t>,
                std::span<const float>, std::span<const int32_t>) override {
    if (!layers.count(at) || count == 0)
      return;
    const int64_t rows = static_cast<int64_t>(logits.size()) / count;
    std::vector<double> &sum = sums[at];
    if (sum.empty())
      sum.assign(static_cast<size_t>(rows), 0.0);
    for (int64_t t = 0; t < count; ++t) {
      const float *row = logits.data() + t * rows;
      int64_t top = -1;
      for (int64_t r = 0; r < rows; ++r)
        if (std::isfinite(row[r]) && (top < 0 || row[r] > row[top]))
          top = r;
      if (top >= 0)
        sum[static_cast<size_t>(top)] += row[top];
    }
    tokens[at] += count;
  }

private:
  const std::set<int64_t> &layers;
  std::map<int64_t, std::vector<double>> &sums;
  std::map<int64_t, int64_t> &tokens;
};

} // namespace

Expected<std::map<int64_t, std::vector<double>>> routingSignatures(Engine &engine, std::span<const int32_t> tokens,
                                                                   const std::set<int64_t> &layers) {
  if (tokens.empty())
    return Status::error("a routing signature needs at least one token");
  if (layers.empty())
    return Status::error("a routing signature needs a layer");
  std::map<int64_t, std::vector<double>> sums;
  std::map<int64_t, int64_t> counted;
  SignatureRecorder recorder(layers, sums, counted);
  // The signature is measured on the whole model (no set applied), as the
  // stored ones were; the caller's masks and observer come back after.
  const std::map<int64_t, std::set<int64_t>> masks = engine.maskedExpertSets();
  EngineObserver *previous = engine.attachedObserver();
  const RoutingCounters routed = engine.routingCounters(); // retrieval is not the request's work
  MOE_RETURN_IF_ERROR(engine.setMaskedExperts({}));
  engine.setObserver(&recorder);
  // Only the layers up to the signature layer run (its router sees
  // nothing of the layers after it).
  KvCache cache = engine.newCache();
  std::vector<float> x;
  Status status = engine.embed(tokens, x);
  for (int64_t l = 0; status.ok() && l <= *layers.rbegin() && l < engine.spec().numLayers; ++l)
    status = engine.forwardLayer(l, x.data(), static_cast<int64_t>(tokens.size()), cache);
  engine.setObserver(previous);
  engine.restoreRoutingCounters(routed);
  MOE_RETURN_IF_ERROR(engine.setMaskedExperts(masks));
  MOE_RETURN_IF_ERROR(status);
  for (int64_t layer : layers) {
    if (counted[layer] == 0)
      return Status::error("layer ", layer, " routed no tokens (is it a MoE layer?)");
    for (double &value : sums[layer])
      value /= static_cast<double>(counted[layer]);
  }
  return sums;
}

std::set<int64_t> signatureLayers(const std::vector<TaskExpertSet> &sets, TaskSignatureScope scope) {
  std::set<int64_t> layers;
  if (sets.empty() || sets.front().signatures.empty())
    return layers;
  for (const auto &[layer, signature] : sets.front().signatures) {
    layers.insert(layer);
    if (scope == TaskSignatureScope::FirstLayer)
      break;
  }
  return layers;
}

size_t nearestTaskSet(const std::vector<TaskExpertSet> &sets,
                      const std::map<int64_t, std::vector<double>> &signatures) {
  size_t best = 0;
  double bestDistance = std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < sets.size(); ++i) {
    double distance = 0;
    for (const auto &[layer, signature] : signatures) {
      auto stored = sets[i].signatures.find(layer);
      for (size_t r = 0; r < signature.size(); ++r) {
        const double theirs = stored != sets[i].signatures.end() && r < stored->second.size() ? stored->second[r] : 0.0;
        distance += (signature[r] - theirs) * (signature[r] - theirs);
      }
    }
    if (distance < bestDistance) {
      bestDistance = distance;
      best = i;
    }
  }
  return best;
}

Expected<size_t> retrieveTaskSet(Engine &engine, const std::vector<TaskExpertSet> &sets,
                                 std::span<const int32_t> prompt, TaskSignatureScope scope) {
  if (sets.empty())
    return Status::error("--task auto: the model carries no task sets");
  Expected<std::map<int64_t, std::vector<double>>> signature =
      routingSignatures(engine, prompt, signatureLayers(sets, scope));
  if (!signature)
    return signature.status();
  const size_t chosen = nearestTaskSet(sets, *signature);
  MOE_RETURN_IF_ERROR(engine.setMaskedExperts(sets[chosen].masked));
  return chosen;
}

Status applyTaskAtLoad(const std::vector<TaskExpertSet> &sets, const std::string &task, EngineOptions &options) {
  if (task.empty() || task == "auto" || task == "all")
    return Status::success();
  Expected<const TaskExpertSet *> set = findTaskSet(sets, task);
  if (!set)
    return set.status();
  if (!options.maskedExperts.empty())
    return Status::error("--task ", task, " sets the masked experts; give no other mask");
  options.maskedExperts = (*set)->masked;
  options.loadMaskedExperts = false;
  return Status::success();
}

} // namespace moe
