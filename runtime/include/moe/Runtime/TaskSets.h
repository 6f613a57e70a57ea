//===- TaskSets.h - Task-adaptive expert sets (PreMoe's retrieval) -*- C++ -*-===//
//
// Part of moec. A package may carry several pruned expert sets, one per
// task, each with the task's routing signature (PreMoe's TCESS pattern:
// the mean over the task's calibration tokens of a vector that holds, per
// token, the raw router logit of its top-1 expert and zeros elsewhere),
// stored for every MoE layer. At load (`--task NAME`) or per request
// (`--task auto`), the engine runs one set: the other experts are masked
// out of routing (their router rows -inf, as if pruned), and with a set
// chosen at load they are never loaded. Retrieval is PreMoe's TAER: the
// prompt's signature at the first MoE layer (or, as an option, at every
// MoE layer), then the stored signature nearest in L2.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_TASKSETS_H
#define MOE_RUNTIME_TASKSETS_H

#include "moe/Runtime/Engine.h"
#include "moe/Support/Status.h"

#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <set>
#include <span>
#include <string>
#include <vector>

namespace moe {

struct ModelDescription;

struct TaskExpertSet {
  std::string name;
  /// Per MoE layer (every one), one entry per router row.
  std::map<int64_t, std::vector<double>> signatures;
  int64_t tokens = 0; ///< Calibration tokens the set and signature came from.
  /// Router rows (= expert slots: sets need a layer without a remap table)
  /// switched off, per MoE layer.
  std::map<int64_t, std::set<int64_t>> masked;
};

/// [{"name", "signatures": {"<layer>": [numbers]}, "tokens", "masked": {"<layer>": [rows]}}].
nlohmann::json taskSetsToJson(const std::vector<TaskExpertSet> &sets);
/// The inverse; errors name `where` and the field.
Expected<std::vector<TaskExpertSet>> taskSetsFromJson(const nlohmann::json &value, const std::string &where);

/// Checks sets against the described model: names unique and not "auto" or
/// "all", signatures for the same MoE layers in every set, each with one
/// finite entry per router row, every masked layer a MoE layer without a
/// remap table, rows in range, at least top-k rows left.
Status validateTaskSets(const std::vector<TaskExpertSet> &sets, const ModelDescription &description,
                        const std::string &where);

/// The set named `name`, or an error listing the sets.
Expected<const TaskExpertSet *> findTaskSet(const std::vector<TaskExpertSet> &sets, const std::string &name);

/// The routing signatures of `tokens` at the MoE layers `layers` (PreMoe's
/// pattern: per token the raw logit of its top-1 row, zeros elsewhere,
/// averaged over tokens), measured with no expert masked (the engine's
/// masks are restored after). Runs the tokens as one window from position
/// 0, through the last of `layers` only.
Expected<std::map<int64_t, std::vector<double>>> routingSignatures(Engine &engine, std::span<const int32_t> tokens,
                                                                   const std::set<int64_t> &layers);

/// Which stored signatures retrieval compares: PreMoe's (the first MoE
/// layer's) or every MoE layer's (one longer vector; a prompt then runs
/// through every layer once more).
enum class TaskSignatureScope { FirstLayer, AllLayers };
/// The layers `scope` compares for `sets`.
std::set<int64_t> signatureLayers(const std::vector<TaskExpertSet> &sets, TaskSignatureScope scope);

/// Index of the set nearest `signatures` in L2 over the layers it holds
/// (ties: the first).
size_t nearestTaskSet(const std::vector<TaskExpertSet> &sets, const std::map<int64_t, std::vector<double>> &signatures);

/// PreMoe's retrieval for one request: the signature of `prompt` at the
/// sets' signature layer, the nearest set, its masks set on `engine`.
/// Returns the set's index. The engine must have every expert loaded.
Expected<size_t> retrieveTaskSet(Engine &engine, const std::vector<TaskExpertSet> &sets,
                                 std::span<const int32_t> prompt,
                                 TaskSignatureScope scope = TaskSignatureScope::FirstLayer);

/// Engine options that run the set named `task` (its masks, its other
/// experts never loaded); nothing for "", "auto" and "all".
Status applyTaskAtLoad(const std::vector<TaskExpertSet> &sets, const std::string &task, EngineOptions &options);

} // namespace moe

#endif // MOE_RUNTIME_TASKSETS_H
