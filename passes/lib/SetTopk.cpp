//===- SetTopk.cpp - Set the number of experts per token ------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "PassSupport.h"
#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Transforms/Passes.h"

#include <set>

namespace moe {
#define GEN_PASS_DEF_MOESETTOPK
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

struct SetTopkPass : public moe::impl::MoeSetTopkBase<SetTopkPass> {
  using MoeSetTopkBase::MoeSetTopkBase;

  void runOnOperation() override {
    if (topK < 1) {
      passError(getOperation(), getArgument()) << "top-k must be at least 1, got " << static_cast<int64_t>(topK);
      return signalPassFailure();
    }
    std::set<int64_t> selected(layers.begin(), layers.end()), seen;
    ir::ModelOp model = getOperation();
    {
      for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
        int64_t index = static_cast<int64_t>(layer.getIndex());
        if (!selected.empty() && !selected.count(index))
          continue;
        for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>()) {
          seen.insert(index);
          int64_t live = std::distance(block.getBody().getOps<ir::ExpertOp>().begin(),
                                       block.getBody().getOps<ir::ExpertOp>().end());
          if (topK > live) {
            passError(layer, getArgument())
                << "top-k " << static_cast<int64_t>(topK) << " exceeds the " << live << " experts of layer " << index;
            return signalPassFailure();
          }
          for (ir::RouterOp router : block.getBody().getOps<ir::RouterOp>()) {
            if (router.getScoring() == ir::ScoringKind::SparseMixer && topK != 2) {
              passError(layer, getArgument())
                  << "layer " << index << " routes with sparsemixer, which selects exactly 2 experts";
              return signalPassFailure();
            }
            router.setTopK(static_cast<uint64_t>(topK));
          }
        }
      }
    }
    for (int64_t index : selected)
      if (!seen.count(index)) {
        passError(getOperation(), getArgument()) << "layer " << index << " is not an MoE layer of the model";
        return signalPassFailure();
      }
  }
};

} // namespace
