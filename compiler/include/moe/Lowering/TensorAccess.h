//===- TensorAccess.h - Bytes behind moe.tensor symbols ---------*- C++ -*-===//
//
// Part of moec. Passes and the exporter read tensors from the model's source checkpoint
// files or its WeightStore, and write new ones to the WeightStore.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_LOWERING_TENSORACCESS_H
#define MOE_LOWERING_TENSORACCESS_H

#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Frontend/WeightStore.h"

#include <map>
#include <memory>

namespace moe {

/// Opens the sources and the store of one moe.model lazily.
class TensorAccess {
public:
  explicit TensorAccess(ir::ModelOp model) : model(model) {}
  /// The tensor's stored dtype and raw bytes.
  Status read(ir::TensorOp tensor, DType &dtype, std::vector<uint8_t> &bytes);
  /// The model's WeightStore (created if needed); fails without `store`.
  Expected<WeightStore *> store();

private:
  ir::ModelOp model;
  std::map<int64_t, std::unique_ptr<SafetensorsFile>> sources;
  std::unique_ptr<WeightStore> weightStore;
};

} // namespace moe

#endif // MOE_LOWERING_TENSORACCESS_H
