//===- LayerLoader.cpp - Engine weights of a module's layers --------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "LayerLoader.h"
#include "moe/Lowering/Lowering.h"

using namespace mlir;

namespace moe {

BlockParts blockParts(ir::LayerOp layer) {
  BlockParts parts;
  for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>()) {
    parts.block = block;
    for (ir::RouterOp router : block.getBody().getOps<ir::RouterOp>())
      parts.router = router;
    for (ir::ExpertOp expert : block.getBody().getOps<ir::ExpertOp>())
      parts.experts.push_back(expert);
  }
  return parts;
}

FailureOr<LayerLoader> LayerLoader::create(ir::ModelOp model, StringRef pass) {
  Expected<ModelDescription> description = lowerToDescription(model, "");
  if (!description)
    return model.emitError() << pass << ": " << description.status().message(), failure();
  LayerLoader loader;
  loader.modelSpec = description->spec;
  loader.provider = makeDescriptionWeightProvider(description.take());
  loader.pass = pass.str();
  return loader;
}

FailureOr<LayerWeights> LayerLoader::load(ir::LayerOp layer) {
  LayerWeights weights;
  Status status = provider->loadLayer(static_cast<int64_t>(layer.getIndex()), weights);
  if (!status.ok())
    return layer.emitError() << pass << ": " << status.message(), failure();
  return weights;
}

} // namespace moe
