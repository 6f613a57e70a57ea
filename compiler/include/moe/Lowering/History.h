//===- History.h - What passes did to a module, kept in the module -*- C++ -*-===//
//
// Part of moec. A module carries its own history so that reports and
// inspect can say what compression did without the run that did it:
//
// - `moe.original` on moe.model, set at import: per layer the number of
//   routed experts and the expert width, and the stored bytes by role
//   group (embedding, attention, routed_experts, ...).
// - `moe.decisions` on moe.model: one entry per pass and layer, appended by
//   the passes that remove, merge or narrow experts: the experts the pass
//   saw (by origin, their id in the checkpoint), the score each got and
//   what became of it.
//
// Packages carry both in their provenance (`original`, `decisions`), in
// the JSON form historyToJson returns.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_LOWERING_HISTORY_H
#define MOE_LOWERING_HISTORY_H

#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Runtime/Description.h"

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace moe {

/// One pass's decisions on one layer. Vectors indexed like `experts` may
/// be empty when the pass has no such number.
struct LayerDecision {
  std::string pass;   ///< "moe-prune-experts".
  std::string method; ///< "easy-ep", "msmoe", "manual", ...
  int64_t layer = 0;
  std::string scoreName;                          ///< What `scores` measures ("gate weight sum").
  std::vector<int64_t> experts;                   ///< Origins of the experts the pass saw.
  std::vector<double> scores;                     ///< Per expert: the score that decided.
  std::vector<double> routed;                     ///< Per expert: calibration tokens routed to it.
  std::vector<int64_t> removed;                   ///< Origins removed (pruned, or merged away).
  std::vector<int64_t> into;                      ///< Per expert: origin of the expert it now runs as (merging).
  std::vector<int64_t> widthsBefore, widthsAfter; ///< Per expert (atoms).
  std::vector<int64_t> protectedExperts;          ///< Origins kept as super experts.
  int64_t calibrationTokens = 0;                  ///< Tokens the statistics saw (0: unknown).
};

/// Appends `decision` to the model's `moe.decisions`.
void recordDecision(ir::ModelOp model, const LayerDecision &decision);

/// Sets `moe.original` from the freshly imported model's description.
Status recordOriginal(ir::ModelOp model, const ModelDescription &description);

/// `moe.task_sets` on moe.model: task-adaptive expert sets (TaskSets.h),
/// set by moec compress's task step, lowered into the description (and so
/// into packages). An array of {name, signatures: {"<layer>": f64 array},
/// tokens, masked: {"<layer>": i64 array of router rows}}.
void setTaskSets(ir::ModelOp model, const std::vector<TaskExpertSet> &sets);
/// The model's task sets (none without the attribute); errors name the field.
Expected<std::vector<TaskExpertSet>> readTaskSets(ir::ModelOp model);

/// {"original": {...} or null, "decisions": [...]}: the module's history
/// as JSON (attribute names as keys; NaN and infinite scores become null).
nlohmann::json historyToJson(ir::ModelOp model);

} // namespace moe

#endif // MOE_LOWERING_HISTORY_H
