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
    json masked = json::object();
    for (const auto &[layer, rows] : set.masked)
      masked[std::to_string(layer)] = std::vector<int64_t>(rows.begin(), rows.end());
    out.push_back({{"name", set.name},
                   {"signature_layer", set.signatureLayer},
                   {"signature", set.signature},
                   {"tokens", set.tokens},
                   {"masked", masked}});
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
    if (!entry.is_object() || !entry.contains("name") || !entry["name"].is_string() ||
        !entry.contains("signature_layer") || !entry["signature_layer"].is_number_integer() ||
        !entry.contains("signature") || !entry["signature"].is_array() || !entry.contains("tokens") ||
        !entry["tokens"].is_number_integer() || !entry.contains("masked") || !entry["masked"].is_object())
      return Status::error(field, ": expected {\"name\": string, \"signature_layer\": int, \"signature\": [numbers], "
                                  "\"tokens\": int, \"masked\": {\"<layer>\": [rows]}}");
    TaskExpertSet set;
    set.name = entry["name"].get<std::string>();
    set.signatureLayer = entry["signature_layer"].get<int64_t>();
    set.tokens = entry["tokens"].get<int64_t>();
    for (const json &number : entry["signature"]) {
      if (!number.is_number())
        return Status::error(field, ".signature: expected numbers, got ", number.dump());
      set.signature.push_back(number.get<double>());
    }
    for (const auto &[key, rows] : entry["masked"].items()) {
      char *end = nullptr;
      const long long layer = std::strtoll(key.c_str(), &end, 10);
      if (key.empty() || *end != '\0' || !rows.is_array())
        return Status::error(field, ".masked: expected layer numbers mapping to arrays of rows, got \"", key, "\"");
      std::set<int64_t> &target = set.masked[layer];
      for (const json &row : rows) {
        if (!row.is_number_integer())
          return Status::error(field, ".masked.", key, ": expected integer rows, got ", row.dump());
        target.insert(row.get<int64_t>());
      }
    }
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
    if (!isMoe(set.signatureLayer))
      return Status::error(field, ": signature_layer ", set.signatureLayer, " is not a MoE layer");
    if (static_cast<int64_t>(set.signature.size()) != routerRows(set.signatureLayer))
      return Status::error(field, ": the signature has ", set.signature.size(), " entries; layer ", set.signatureLayer,
                           " has ", routerRows(set.signatureLayer), " router rows");
    for (double value : set.signature)
      if (!std::isfinite(value))
        return Status::error(field, ": the signature has a non-finite entry");
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
      if (count - static_cast<int64_t>(rows.size()) < std::max(topK, spec.router.topK))
        return Status::error(field, ": layer ", layer, " keeps ", count - static_cast<int64_t>(rows.size()),
                             " experts, fewer than top-k ", std::max(topK, spec.router.topK));
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

/// PreMoe's marker at one layer: per token the top-1 row's raw logit.
class SignatureRecorder : public EngineObserver {
public:
  SignatureRecorder(int64_t layer, std::vector<double> &sum, int64_t &tokens)
      : layer(layer), sum(sum), tokens(tokens) {}
  void onRouter(int64_t at, int64_t count, std::span<const float> logits, std::span<const int32_t>,
                std::span<const float>, std::span<const int32_t>) override {
    if (at != layer || count == 0)
      return;
    const int64_t rows = static_cast<int64_t>(logits.size()) / count;
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
    tokens += count;
  }

private:
  int64_t layer;
  std::vector<double> &sum;
  int64_t &tokens;
};

} // namespace

Expected<std::vector<double>> routingSignature(Engine &engine, std::span<const int32_t> tokens, int64_t layer) {
  if (tokens.empty())
    return Status::error("a routing signature needs at least one token");
  std::vector<double> sum;
  int64_t counted = 0;
  SignatureRecorder recorder(layer, sum, counted);
  // The signature is measured on the whole model (no set applied), as the
  // stored ones were; the caller's masks and observer come back after.
  const std::map<int64_t, std::set<int64_t>> masks = engine.maskedExpertSets();
  EngineObserver *previous = engine.attachedObserver();
  MOE_RETURN_IF_ERROR(engine.setMaskedExperts({}));
  engine.setObserver(&recorder);
  // Only the layers up to the signature layer run (its router sees
  // nothing of the layers after it).
  KvCache cache = engine.newCache();
  std::vector<float> x;
  Status status = engine.embed(tokens, x);
  for (int64_t l = 0; status.ok() && l <= layer && l < engine.spec().numLayers; ++l)
    status = engine.forwardLayer(l, x.data(), static_cast<int64_t>(tokens.size()), cache);
  engine.setObserver(previous);
  MOE_RETURN_IF_ERROR(engine.setMaskedExperts(masks));
  MOE_RETURN_IF_ERROR(status);
  if (counted == 0)
    return Status::error("layer ", layer, " routed no tokens (is it a MoE layer?)");
  for (double &value : sum)
    value /= static_cast<double>(counted);
  return sum;
}

size_t nearestTaskSet(const std::vector<TaskExpertSet> &sets, const std::vector<double> &signature) {
  size_t best = 0;
  double bestDistance = std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < sets.size(); ++i) {
    double distance = 0;
    for (size_t r = 0; r < signature.size(); ++r) {
      const double d = signature[r] - (r < sets[i].signature.size() ? sets[i].signature[r] : 0.0);
      distance += d * d;
    }
    if (distance < bestDistance) {
      bestDistance = distance;
      best = i;
    }
  }
  return best;
}

Expected<size_t> retrieveTaskSet(Engine &engine, const std::vector<TaskExpertSet> &sets,
                                 std::span<const int32_t> prompt) {
  if (sets.empty())
    return Status::error("--task auto: the model carries no task sets");
  Expected<std::vector<double>> signature = routingSignature(engine, prompt, sets.front().signatureLayer);
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
