//===- PruneExperts.cpp - Remove the lowest-scored experts ----------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Transforms/Passes.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Transforms/TensorAccess.h"

#include "ExpertEditing.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <set>

namespace moe {
#define GEN_PASS_DEF_MOEPRUNEEXPERTS
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

struct Candidate {
  int64_t layer, expert;
  double score;
};

/// A statistics tensor of `layer` as doubles (I64 or F64).
FailureOr<std::vector<double>> readStatistic(const SafetensorsFile &file, int64_t layer, StringRef name,
                                             Operation *op) {
  std::string key = concat("layers.", layer, ".", name.str());
  const TensorInfo *info = file.find(key);
  if (!info || (info->dtype != DType::F64 && info->dtype != DType::I64)) {
    op->emitError() << "moe-prune-experts: " << file.path() << " has no statistic '" << key
                    << "' (F64 or I64); was it written by moec calibrate for this model?";
    return failure();
  }
  std::vector<double> values(static_cast<size_t>(info->numElements()));
  const uint8_t *bytes = file.data(*info).data();
  for (size_t i = 0; i < values.size(); ++i) {
    if (info->dtype == DType::F64) {
      std::memcpy(&values[i], bytes + 8 * i, 8);
    } else {
      int64_t value;
      std::memcpy(&value, bytes + 8 * i, 8);
      values[i] = static_cast<double>(value);
    }
  }
  return values;
}

struct PruneExpertsPass : public moe::impl::MoePruneExpertsBase<PruneExpertsPass> {
  using MoePruneExpertsBase::MoePruneExpertsBase;

  void runOnOperation() override {
    ModuleOp module = getOperation();
    std::string statistic = method == "frequency"     ? "routed_tokens"
                            : method == "gate-weight" ? "gate_weight_sum"
                            : method == "easy-ep"     ? "easy_ep_score"
                                                      : "";
    if (statistic.empty()) {
      module.emitError() << "moe-prune-experts: method '" << method.getValue()
                         << "' is not frequency, gate-weight or easy-ep";
      return signalPassFailure();
    }
    if (scope != "layer" && scope != "global") {
      module.emitError() << "moe-prune-experts: scope '" << scope.getValue() << "' is not layer or global";
      return signalPassFailure();
    }
    if (ratio < 0.0 || ratio >= 1.0 || keep < 0 || (keep > 0 && ratio > 0.0) || (keep > 0 && scope == "global")) {
      module.emitError() << "moe-prune-experts: give ratio in [0, 1) or keep > 0 (per layer), not both";
      return signalPassFailure();
    }
    if (stats.empty()) {
      module.emitError("moe-prune-experts: the stats option (a moec calibrate file) is required");
      return signalPassFailure();
    }
    Expected<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::open(stats);
    if (!file) {
      module.emitError() << "moe-prune-experts: " << file.status().message();
      return signalPassFailure();
    }

    for (ir::ModelOp model : module.getOps<ir::ModelOp>()) {
      // Scores, super experts and per-layer limits.
      std::vector<Candidate> candidates;
      std::map<int64_t, ir::LayerOp> layers;
      std::map<int64_t, int64_t> liveExperts, topK;
      std::vector<std::pair<double, std::pair<int64_t, int64_t>>> maxOutputs;
      for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>())
        for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>()) {
          int64_t index = static_cast<int64_t>(layer.getIndex());
          layers[index] = layer;
          topK[index] = static_cast<int64_t>((*block.getBody().getOps<ir::RouterOp>().begin()).getTopK());
          FailureOr<std::vector<double>> scores = readStatistic(**file, index, statistic, layer);
          FailureOr<std::vector<double>> outputs = readStatistic(**file, index, "max_abs_output", layer);
          if (failed(scores) || failed(outputs))
            return signalPassFailure();
          for (ir::ExpertOp expert : block.getBody().getOps<ir::ExpertOp>()) {
            int64_t id = static_cast<int64_t>(expert.getId());
            if (id >= static_cast<int64_t>(scores->size())) {
              expert.emitError() << "moe-prune-experts: the statistics have " << scores->size()
                                 << " experts for layer " << index << "; calibrate the model as it is now";
              return signalPassFailure();
            }
            candidates.push_back({index, id, (*scores)[id]});
            maxOutputs.push_back({(*outputs)[id], {index, id}});
            ++liveExperts[index];
          }
        }
      std::set<std::pair<int64_t, int64_t>> protectedExperts;
      if (protectSuperExperts && !maxOutputs.empty()) {
        std::vector<double> sorted;
        for (const auto &entry : maxOutputs)
          sorted.push_back(entry.first);
        std::sort(sorted.begin(), sorted.end());
        double percentile = sorted[static_cast<size_t>(std::floor(0.995 * static_cast<double>(sorted.size() - 1)))];
        double largest = sorted.back();
        for (const auto &[value, where] : maxOutputs)
          if (value > percentile && value > 0.1 * largest)
            protectedExperts.insert(where);
        // With few experts the 99.5th percentile is the maximum itself, so
        // the largest outlier is protected when it stands far above the rest.
        if (protectedExperts.empty() && sorted.size() > 1 && largest > 10.0 * sorted[sorted.size() - 2])
          for (const auto &[value, where] : maxOutputs)
            if (value == largest)
              protectedExperts.insert(where);
        superExpertsProtected += static_cast<int64_t>(protectedExperts.size());
      }

      // Lowest scores first; ties keep the lower id.
      std::sort(candidates.begin(), candidates.end(), [](const Candidate &a, const Candidate &b) {
        return a.score != b.score ? a.score < b.score
                                  : (a.layer != b.layer ? a.layer < b.layer : a.expert > b.expert);
      });
      std::map<int64_t, std::set<int64_t>> drop;
      auto budgetFor = [&](int64_t layer) {
        return keep > 0 ? std::max<int64_t>(0, liveExperts[layer] - keep)
                        : static_cast<int64_t>(std::llround(ratio * static_cast<double>(liveExperts[layer])));
      };
      int64_t globalBudget = static_cast<int64_t>(std::llround(ratio * static_cast<double>(candidates.size())));
      int64_t dropped = 0;
      for (const Candidate &candidate : candidates) {
        if (protectedExperts.count({candidate.layer, candidate.expert}))
          continue;
        std::set<int64_t> &layerDrop = drop[candidate.layer];
        int64_t remaining = liveExperts[candidate.layer] - static_cast<int64_t>(layerDrop.size());
        if (remaining - 1 < topK[candidate.layer])
          continue;
        if (scope == "layer" ? static_cast<int64_t>(layerDrop.size()) >= budgetFor(candidate.layer)
                             : dropped >= globalBudget)
          continue;
        layerDrop.insert(candidate.expert);
        ++dropped;
      }
      TensorAccess access(model);
      for (const auto &[index, ids] : drop) {
        if (ids.empty())
          continue;
        DropCounts counts;
        if (failed(dropExperts(model, layers[index], ids, access, getArgument(), counts)))
          return signalPassFailure();
        expertsPruned += counts.experts;
      }
    }
  }
};

} // namespace
