//===- LayerLoader.h - Engine weights of a module's layers ----*- C++ -*-===//
//
// Part of moec. Internal to the passes: a layer's block parts in the IR,
// and its weights as the engine holds them (through the backend's
// lowering), for passes that run the engine's MoE block (MoeBlock.h).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_LAYERLOADER_H
#define MOE_PASSES_LIB_LAYERLOADER_H

#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Runtime/Description.h"
#include "moe/Runtime/MoeBlock.h"

#include "llvm/ADT/SmallVector.h"

#include <memory>
#include <string>

namespace moe {

/// The router and experts of a layer's moe_block (null when dense).
struct BlockParts {
  ir::MoeBlockOp block;
  ir::RouterOp router;
  llvm::SmallVector<ir::ExpertOp> experts;
};
BlockParts blockParts(ir::LayerOp layer);

/// The engine's weights of one layer of the module as it is now (through
/// the backend's lowering), for passes that run the engine's MoE block on
/// cached block inputs.
class LayerLoader {
public:
  static mlir::FailureOr<LayerLoader> create(ir::ModelOp model, llvm::StringRef pass);
  mlir::FailureOr<LayerWeights> load(ir::LayerOp layer);
  const ModelSpec &spec() const { return modelSpec; }

private:
  ModelSpec modelSpec;
  std::shared_ptr<WeightProvider> provider;
  std::string pass;
};

} // namespace moe

#endif // MOE_PASSES_LIB_LAYERLOADER_H
