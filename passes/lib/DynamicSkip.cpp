//===- DynamicSkip.cpp - Per-layer thresholds for skipping weak experts ---===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "PassSupport.h"
#include "moe/Transforms/Passes.h"

#include "LayerLoader.h"
#include "StatisticsReader.h"
#include "SuperExperts.h"

#include "mlir/IR/Builders.h"

#include <algorithm>
#include <cmath>

namespace moe {
#define GEN_PASS_DEF_MOEDYNAMICSKIP
#include "moe/Transforms/Passes.h.inc"
} // namespace moe

using namespace mlir;
using namespace moe;

namespace {

struct DynamicSkipPass : public moe::impl::MoeDynamicSkipBase<DynamicSkipPass> {
  using MoeDynamicSkipBase::MoeDynamicSkipBase;

  void runOnOperation() override {
    ir::ModelOp module = getOperation();
    if (!(quantile > 0.0 && quantile < 1.0)) {
      passError(module, getArgument()) << "quantile must be in (0, 1), got " << quantile;
      return signalPassFailure();
    }
    FailureOr<StatisticsReader> file = StatisticsReader::open(stats, module, getArgument());
    if (failed(file))
      return signalPassFailure();
    ir::ModelOp model = module;
    FailureOr<LayerLoader> loader = LayerLoader::create(model, getArgument());
    if (failed(loader))
      return signalPassFailure();
    for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>()) {
      BlockParts parts = blockParts(layer);
      if (!parts.block)
        continue;
      if (parts.router.getTopK() < 2) {
        parts.router.emitRemark() << "moe-dynamic-skip: layer " << layer.getIndex()
                                  << " routes to one expert; nothing to skip";
        continue;
      }
      const int64_t index = static_cast<int64_t>(layer.getIndex());
      FailureOr<StatisticsReader::BlockSamples> blocks = file->blockSamples(index, loader->spec().hiddenSize, layer);
      if (failed(blocks))
        return signalPassFailure();
      FailureOr<LayerWeights> weights = loader->load(layer);
      if (failed(weights))
        return signalPassFailure();
      std::vector<double> values = secondToFirstWeightRatios(
          loader->spec(), loader->spec().layers[static_cast<size_t>(index)], *weights, blocks->view());
      std::sort(values.begin(), values.end());
      // The quantile by linear interpolation between order statistics.
      double position = quantile * static_cast<double>(values.size() - 1);
      size_t below = static_cast<size_t>(std::floor(position));
      size_t above = std::min(values.size() - 1, below + 1);
      double beta = values[below] + (position - static_cast<double>(below)) * (values[above] - values[below]);
      parts.router.setSkipThresholdAttr(Builder(module.getContext()).getF64FloatAttr(beta));
      ++layersThresholded;
    }
  }
};

} // namespace
