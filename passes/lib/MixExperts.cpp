//===- MixExperts.cpp - Experts as weighted sums (EEP's expert merging) ---===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "PassSupport.h"
#include "moe/Lowering/History.h"
#include "moe/Lowering/TensorAccess.h"
#include "moe/Transforms/ExpertMix.h"
#include "moe/Transforms/Passes.h"

#include "ExpertEditing.h"

#include <array>
#include <map>
#include <set>

namespace moe {
#define GEN_PASS_DEF_MOEMIXEXPERTS
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

/// An expert's gate, up and down as f32, and their stored dtypes.
struct ExpertValues {
  std::array<std::vector<float>, 3> matrices;
  std::array<DType, 3> dtypes = {DType::BF16, DType::BF16, DType::BF16};
};

struct MixExpertsPass : public moe::impl::MoeMixExpertsBase<MixExpertsPass> {
  using MoeMixExpertsBase::MoeMixExpertsBase;

  void runOnOperation() override {
    ir::ModelOp model = getOperation();
    Expected<ExpertMixes> mixes = parseExpertMixes(mix);
    if (!mixes) {
      passError(model, getArgument()) << "mix: " << mixes.status().message();
      return signalPassFailure();
    }
    if (failed(refuseSplitExperts(model, getArgument())))
      return signalPassFailure();
    TensorAccess access(model);
    std::set<int64_t> seen;
    for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
      const int64_t index = static_cast<int64_t>(layer.getIndex());
      auto found = mixes->find(index);
      if (found == mixes->end())
        continue;
      seen.insert(index);
      if (failed(mixLayer(model, layer, found->second, access)))
        return signalPassFailure();
    }
    for (const auto &[layer, targets] : *mixes)
      if (!seen.count(layer)) {
        passError(model, getArgument()) << "layer " << layer << " does not exist";
        return signalPassFailure();
      }
  }

  LogicalResult mixLayer(ir::ModelOp model, ir::LayerOp layer,
                         const std::map<int64_t, std::vector<ExpertMixTerm>> &targets, TensorAccess &access) {
    const int64_t index = static_cast<int64_t>(layer.getIndex());
    std::map<int64_t, ir::ExpertOp> experts;
    layer.walk([&](ir::ExpertOp expert) { experts[static_cast<int64_t>(expert.getId())] = expert; });
    if (experts.empty())
      return passError(layer, getArgument()) << "layer " << index << " has no routed experts to mix";
    auto expertOf = [&](int64_t id, const char *role) -> FailureOr<ir::ExpertOp> {
      auto it = experts.find(id);
      if (it == experts.end()) {
        passError(layer, getArgument()) << "layer " << index << " has no expert " << id << " (" << role << ")";
        return failure();
      }
      return it->second;
    };
    // Every id is checked before anything is read, and every source read
    // before any target is written.
    std::set<int64_t> reads;
    for (const auto &[target, terms] : targets) {
      if (terms.empty())
        return passError(layer, getArgument()) << "expert " << target << " of layer " << index << " has no terms";
      if (failed(expertOf(target, "a target")))
        return failure();
      reads.insert(target);
      for (const ExpertMixTerm &term : terms) {
        if (failed(expertOf(term.source, "a source")))
          return failure();
        reads.insert(term.source);
      }
    }
    std::map<int64_t, ExpertValues> values;
    for (int64_t id : reads) {
      ir::ExpertOp source = experts.at(id);
      ExpertValues &v = values[id];
      const FlatSymbolRefAttr symbols[3] = {source.getGateAttr(), source.getUpAttr(), source.getDownAttr()};
      for (int m = 0; m < 3; ++m) {
        DType dtype;
        FailureOr<std::vector<float>> read = readF32(model, access, symbols[m], dtype);
        if (failed(read))
          return failure();
        v.matrices[m] = std::move(*read);
        v.dtypes[m] = dtype;
      }
    }
    LayerDecision decision{getArgument().str(), "eep-merge", index};
    decision.scoreName = "coefficient of the expert's own weights in its mix";
    for (auto &[id, expert] : experts) {
      decision.experts.push_back(expert.getOriginalId());
      double own = 1.0;
      if (auto it = targets.find(id); it != targets.end()) {
        own = 0.0;
        for (const ExpertMixTerm &term : it->second)
          if (term.source == id)
            own = term.coefficient;
      }
      decision.scores.push_back(own);
    }
    for (const auto &[target, terms] : targets) {
      ir::ExpertOp expert = experts.at(target);
      const FlatSymbolRefAttr old[3] = {expert.getGateAttr(), expert.getUpAttr(), expert.getDownAttr()};
      FlatSymbolRefAttr written[3];
      for (int m = 0; m < 3; ++m) {
        ir::TensorOp like = lookupTensor(model, old[m]);
        const size_t size = static_cast<size_t>(like.getTensorType().getNumElements());
        std::vector<std::span<const float>> sources;
        for (const ExpertMixTerm &term : terms) {
          const std::vector<float> &source = values.at(term.source).matrices[m];
          if (source.size() != size)
            return passError(layer, getArgument())
                   << "expert " << term.source << " of layer " << index << " is not the shape of expert " << target
                   << " (" << source.size() << " values in its "
                   << (m == 0   ? "gate"
                       : m == 1 ? "up"
                                : "down")
                   << ", not " << size << "): mix experts before moe-prune-atoms";
          sources.push_back(source);
        }
        std::vector<float> mixed(size);
        mixMatrix(terms, sources, mixed);
        FailureOr<FlatSymbolRefAttr> symbol =
            writeTensor(model, access, like, (like.getSymName() + ".mix").str(), like.getTensorType().getShape(), mixed,
                        values.at(target).dtypes[static_cast<size_t>(m)]);
        if (failed(symbol))
          return failure();
        written[m] = *symbol;
      }
      expert.setGateAttr(written[0]);
      expert.setUpAttr(written[1]);
      expert.setDownAttr(written[2]);
      ++expertsMixed;
    }
    recordDecision(model, decision);
    eraseUnusedTensors(model);
    return success();
  }
};

} // namespace
