//===- DropExperts.cpp - Remove listed experts, slice the router ----------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "PassSupport.h"
#include "moe/Lowering/History.h"
#include "moe/Lowering/TensorAccess.h"
#include "moe/Transforms/Passes.h"

#include "ExpertEditing.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinTypes.h"
#include "llvm/ADT/StringExtras.h"

#include <map>
#include <set>

namespace moe {
#define GEN_PASS_DEF_MOEDROPEXPERTS
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

/// Parses "layer:id,id;layer:id" into layer -> ids.
LogicalResult parseExperts(StringRef text, std::map<int64_t, std::set<int64_t>> &out, std::string &error) {
  SmallVector<StringRef> groups;
  text.split(groups, ';', -1, /*KeepEmpty=*/false);
  for (StringRef group : groups) {
    auto [layerText, idsText] = group.split(':');
    int64_t layer;
    if (layerText.trim().getAsInteger(10, layer) || idsText.empty()) {
      error = ("expected 'layer:id,id;...', got '" + group + "'").str();
      return failure();
    }
    SmallVector<StringRef> ids;
    idsText.split(ids, ',', -1, false);
    for (StringRef idText : ids) {
      int64_t id;
      if (idText.trim().getAsInteger(10, id) || id < 0) {
        error = ("expert id '" + idText + "' in '" + group + "' is not a non-negative integer").str();
        return failure();
      }
      out[layer].insert(id);
    }
  }
  return success();
}

struct DropExpertsPass : public moe::impl::MoeDropExpertsBase<DropExpertsPass> {
  using MoeDropExpertsBase::MoeDropExpertsBase;

  void runOnOperation() override {
    std::map<int64_t, std::set<int64_t>> requested;
    std::string error;
    if (failed(parseExperts(experts, requested, error))) {
      getOperation().emitError("moe-drop-experts: ") << error;
      return signalPassFailure();
    }
    ir::ModelOp model = getOperation();
    if (failed(refuseSplitExperts(model, getArgument())))
      return signalPassFailure();
    TensorAccess access(model);
    std::set<int64_t> seen;
    for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
      int64_t index = static_cast<int64_t>(layer.getIndex());
      auto found = requested.find(index);
      if (found == requested.end())
        continue;
      seen.insert(index);
      LayerDecision decision{getArgument().str(), "manual", index};
      layer.walk([&](ir::ExpertOp expert) {
        if (expert.getPartOffset().value_or(0) != 0)
          return;
        decision.experts.push_back(expert.getOriginalId());
        if (found->second.count(static_cast<int64_t>(expert.getId())))
          decision.removed.push_back(expert.getOriginalId());
      });
      recordDecision(model, decision);
      DropCounts counts;
      if (failed(dropExperts(model, layer, found->second, access, getArgument(), counts)))
        return signalPassFailure();
      expertsDropped += counts.experts;
      parametersDropped += counts.parameters;
    }
    for (const auto &[layer, ids] : requested)
      if (!seen.count(layer)) {
        passError(model, getArgument()) << "layer " << layer << " does not exist";
        return signalPassFailure();
      }
  }
};

} // namespace
