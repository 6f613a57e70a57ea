//===- ExpertEditing.cpp - Removing experts from a moe_block --------------===//
//
// Part of moec. Shared by the passes that remove experts (moe-drop-experts,
// moe-prune-experts): router rows sliced into the WeightStore, experts
// renumbered, group-limited routing adjusted, orphaned tensors erased.
//
//===----------------------------------------------------------------------===//

#include "ExpertEditing.h"

#include "mlir/IR/Builders.h"
#include "mlir/IR/BuiltinTypes.h"
#include "moe/Frontend/Checkpoint.h"
#include "moe/Support/HugePages.h"

#include <cstring>

using namespace mlir;

namespace moe {

/// Writes rows `keep` of the tensor behind `symbol` (dimension 0) to the
/// store under `key` and returns the new tensor op's symbol.
FailureOr<FlatSymbolRefAttr> sliceRows(ir::ModelOp model, TensorAccess &access, FlatSymbolRefAttr symbol,
                                       ArrayRef<int64_t> keep, StringRef suffix) {
  auto tensor = cast<ir::TensorOp>(SymbolTable::lookupSymbolIn(model, symbol.getAttr()));
  DType dtype;
  std::vector<uint8_t> bytes;
  Status status = access.read(tensor, dtype, bytes);
  if (!status.ok())
    return tensor.emitError(status.message()), failure();
  ArrayRef<int64_t> shape = tensor.getTensorType().getShape();
  int64_t rowBytes = static_cast<int64_t>(bytes.size()) / shape[0];
  std::vector<uint8_t> sliced;
  for (int64_t row : keep)
    sliced.insert(sliced.end(), bytes.begin() + row * rowBytes, bytes.begin() + (row + 1) * rowBytes);
  SmallVector<int64_t> newShape(shape);
  newShape[0] = static_cast<int64_t>(keep.size());
  std::string name = (tensor.getSymName() + suffix).str();
  FailureOr<std::string> key = appendToStore(model, access, name, dtype, newShape, sliced);
  if (failed(key))
    return failure();
  OpBuilder builder(tensor);
  builder.setInsertionPointAfter(tensor);
  if (SymbolTable::lookupSymbolIn(model, builder.getStringAttr(name)))
    SymbolTable::lookupSymbolIn(model, builder.getStringAttr(name))->erase();
  builder.create<ir::TensorOp>(tensor.getLoc(), builder.getStringAttr(name),
                               TypeAttr::get(RankedTensorType::get(newShape, tensor.getTensorType().getElementType())),
                               builder.getStringAttr(*key), IntegerAttr(), DenseI64ArrayAttr(), tensor.getQuantAttr());
  return FlatSymbolRefAttr::get(builder.getContext(), name);
}

FailureOr<std::string> appendToStore(ir::ModelOp model, TensorAccess &access, const std::string &name, DType dtype,
                                     ArrayRef<int64_t> shape, std::span<const uint8_t> bytes) {
  Expected<WeightStore *> store = access.store();
  if (!store)
    return model.emitError(store.status().message()), failure();
  // The store picks the key under its lock: a name another writer holds
  // with other contents becomes <name>.v2, .v3, ...
  Expected<std::string> key = (*store)->put(name, dtype, std::vector<int64_t>(shape.begin(), shape.end()), bytes);
  if (!key)
    return model.emitError(key.status().message()), failure();
  return key.take();
}

ir::TensorOp lookupTensor(ir::ModelOp model, FlatSymbolRefAttr symbol) {
  return cast<ir::TensorOp>(SymbolTable::lookupSymbolIn(model, symbol.getAttr()));
}

FailureOr<std::vector<float>> readF32(ir::ModelOp model, TensorAccess &access, FlatSymbolRefAttr symbol, DType &dtype) {
  ir::TensorOp tensor = lookupTensor(model, symbol);
  std::vector<uint8_t> bytes;
  Status status = access.read(tensor, dtype, bytes);
  if (!status.ok())
    return tensor.emitError(status.message()), failure();
  if (!isFloatDType(dtype))
    return tensor.emitError() << "tensor has dtype " << dtypeName(dtype) << "; expected a float dtype", failure();
  std::vector<float> values;
  resizeLarge(values, bytes.size() / dtypeBytes(dtype));
  if (static_cast<int64_t>(values.size()) != tensor.getTensorType().getNumElements())
    return tensor.emitError() << "stored tensor has " << values.size() << " elements, its type "
                              << tensor.getTensorType().getNumElements(),
           failure();
  status = convertToF32(dtype, bytes.data(), values.size(), values.data());
  if (!status.ok())
    return tensor.emitError(status.message()), failure();
  std::string scaleName = (tensor.getSymName() + "_scale_inv").str();
  if (auto scale = dyn_cast_or_null<ir::TensorOp>(
          SymbolTable::lookupSymbolIn(model, StringAttr::get(model.getContext(), scaleName)))) {
    DType scaleType;
    FailureOr<std::vector<float>> scales =
        readF32(model, access, FlatSymbolRefAttr::get(scale.getSymNameAttr()), scaleType);
    if (failed(scales))
      return failure();
    ArrayRef<int64_t> shape = tensor.getTensorType().getShape();
    applyFp8BlockScales(values.data(), 0, shape[0], shape[1], scales->data());
  }
  return values;
}

FailureOr<FlatSymbolRefAttr> writeTensor(ir::ModelOp model, TensorAccess &access, ir::TensorOp like, StringRef name,
                                         ArrayRef<int64_t> shape, const std::vector<float> &values, DType dtype) {
  if (dtype != DType::F32 && dtype != DType::F16)
    dtype = DType::BF16;
  std::vector<uint8_t> bytes(values.size() * dtypeBytes(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == DType::F32) {
      std::memcpy(bytes.data() + 4 * i, &values[i], 4);
    } else {
      uint16_t bits = dtype == DType::F16 ? floatToHalf(values[i]) : floatToBfloat16(values[i]);
      std::memcpy(bytes.data() + 2 * i, &bits, 2);
    }
  }
  FailureOr<std::string> key = appendToStore(model, access, name.str(), dtype, shape, bytes);
  if (failed(key))
    return failure();
  OpBuilder builder(like);
  builder.setInsertionPointAfter(like);
  StringAttr nameAttr = builder.getStringAttr(name);
  if (Operation *existing = SymbolTable::lookupSymbolIn(model, nameAttr))
    existing->erase();
  Type element = dtype == DType::F32   ? builder.getF32Type()
                 : dtype == DType::F16 ? builder.getF16Type()
                                       : builder.getBF16Type();
  builder.create<ir::TensorOp>(like.getLoc(), nameAttr, TypeAttr::get(RankedTensorType::get(shape, element)),
                               builder.getStringAttr(*key), IntegerAttr(), DenseI64ArrayAttr(), ir::QuantAttr());
  return FlatSymbolRefAttr::get(builder.getContext(), name);
}

FailureOr<FlatSymbolRefAttr> selectSlices(ir::ModelOp model, TensorAccess &access, FlatSymbolRefAttr symbol,
                                          ArrayRef<int64_t> keep, int dim, StringRef suffix) {
  ir::TensorOp tensor = lookupTensor(model, symbol);
  ArrayRef<int64_t> shape = tensor.getTensorType().getShape();
  const int64_t rows = shape[0], cols = shape[1];
  SmallVector<int64_t> newShape(shape);
  newShape[dim] = static_cast<int64_t>(keep.size());
  std::string name = (tensor.getSymName() + suffix).str();
  std::string scaleName = (tensor.getSymName() + "_scale_inv").str();
  if (SymbolTable::lookupSymbolIn(model, StringAttr::get(model.getContext(), scaleName))) {
    DType dtype;
    FailureOr<std::vector<float>> values = readF32(model, access, symbol, dtype);
    if (failed(values))
      return failure();
    std::vector<float> selected;
    for (int64_t r = 0; r < (dim == 0 ? static_cast<int64_t>(keep.size()) : rows); ++r)
      for (int64_t c = 0; c < (dim == 1 ? static_cast<int64_t>(keep.size()) : cols); ++c)
        selected.push_back((*values)[(dim == 0 ? keep[r] : r) * cols + (dim == 1 ? keep[c] : c)]);
    return writeTensor(model, access, tensor, name, newShape, selected, DType::BF16);
  }
  if (dim == 0)
    return sliceRows(model, access, symbol, keep, suffix);
  DType dtype;
  std::vector<uint8_t> bytes;
  Status status = access.read(tensor, dtype, bytes);
  if (!status.ok())
    return tensor.emitError(status.message()), failure();
  const size_t element = dtypeBytes(dtype);
  std::vector<uint8_t> selected;
  selected.reserve(static_cast<size_t>(rows) * keep.size() * element);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c : keep)
      selected.insert(selected.end(), bytes.begin() + (r * cols + c) * element,
                      bytes.begin() + (r * cols + c + 1) * element);
  FailureOr<std::string> key = appendToStore(model, access, name, dtype, newShape, selected);
  if (failed(key))
    return failure();
  OpBuilder builder(tensor);
  builder.setInsertionPointAfter(tensor);
  StringAttr nameAttr = builder.getStringAttr(name);
  if (Operation *existing = SymbolTable::lookupSymbolIn(model, nameAttr))
    existing->erase();
  builder.create<ir::TensorOp>(tensor.getLoc(), nameAttr,
                               TypeAttr::get(RankedTensorType::get(newShape, tensor.getTensorType().getElementType())),
                               builder.getStringAttr(*key), IntegerAttr(), DenseI64ArrayAttr(), tensor.getQuantAttr());
  return FlatSymbolRefAttr::get(builder.getContext(), name);
}

LogicalResult dropExperts(ir::ModelOp model, ir::LayerOp layer, const std::set<int64_t> &drop, TensorAccess &access,
                          StringRef passName, DropCounts &counts) {
  auto blocks = layer.getBody().getOps<ir::MoeBlockOp>();
  if (blocks.empty())
    return layer.emitError() << passName << ": layer " << layer.getIndex() << " has no experts";
  ir::MoeBlockOp block = *blocks.begin();
  ir::RouterOp router = *block.getBody().getOps<ir::RouterOp>().begin();
  if (router.getRemap())
    return router.emitError() << passName << ": dropping experts of a merged layer (router remap) is not supported";
  SmallVector<ir::ExpertOp> experts(block.getBody().getOps<ir::ExpertOp>());
  std::set<int64_t> ids;
  for (ir::ExpertOp expert : experts)
    ids.insert(static_cast<int64_t>(expert.getId()));
  for (int64_t id : drop)
    if (!ids.count(id))
      return layer.emitError() << passName << ": layer " << layer.getIndex() << " has no expert " << id;
  SmallVector<int64_t> keep;
  for (ir::ExpertOp expert : experts)
    if (!drop.count(static_cast<int64_t>(expert.getId())))
      keep.push_back(static_cast<int64_t>(expert.getId()));
  if (static_cast<int64_t>(keep.size()) < static_cast<int64_t>(router.getTopK()))
    return router.emitError() << passName << ": layer " << layer.getIndex() << " would keep " << keep.size()
                              << " experts, fewer than top_k " << router.getTopK()
                              << "; lower it with moe-set-topk first";

  // Router rows (and the correction bias) of the kept experts.
  std::string suffix = ".drop";
  FailureOr<FlatSymbolRefAttr> weight = sliceRows(model, access, router.getWeightAttr(), keep, suffix);
  if (failed(weight))
    return failure();
  router.setWeightAttr(*weight);
  if (FlatSymbolRefAttr bias = router.getCorrectionBiasAttr()) {
    FailureOr<FlatSymbolRefAttr> sliced = sliceRows(model, access, bias, keep, suffix);
    if (failed(sliced))
      return failure();
    router.setCorrectionBiasAttr(*sliced);
  }

  // Group-limited routing keeps its groups only if they shrink evenly.
  if (router.getSelection() != ir::SelectionKind::TopK) {
    int64_t groups = static_cast<int64_t>(router.getGroups());
    int64_t perGroup = static_cast<int64_t>(experts.size()) / groups;
    std::vector<int64_t> droppedPerGroup(groups, 0);
    for (int64_t id : drop)
      ++droppedPerGroup[id / perGroup];
    bool even = std::all_of(droppedPerGroup.begin(), droppedPerGroup.end(),
                            [&](int64_t n) { return n == droppedPerGroup[0]; }) &&
                droppedPerGroup[0] < perGroup;
    if (!even) {
      OpBuilder builder(router);
      router.setSelection(ir::SelectionKind::TopK);
      router.setGroups(1);
      router.setTopKGroups(1);
      router.emitRemark() << "layer " << layer.getIndex()
                          << ": experts dropped unevenly across routing groups; using ungrouped top-k";
    }
  }

  // Remove the experts and their tensors; renumber the rest in order.
  int64_t newId = 0;
  for (ir::ExpertOp expert : experts) {
    if (drop.count(static_cast<int64_t>(expert.getId()))) {
      for (FlatSymbolRefAttr symbol : {expert.getGateAttr(), expert.getUpAttr(), expert.getDownAttr()}) {
        auto tensor = cast<ir::TensorOp>(SymbolTable::lookupSymbolIn(model, symbol.getAttr()));
        counts.parameters += tensor.getTensorType().getNumElements();
      }
      expert->erase(); // its tensors go with eraseUnusedTensors below
      continue;
    }
    renumberExpert(expert, newId++);
  }
  counts.experts += static_cast<int64_t>(drop.size());
  eraseUnusedTensors(model);
  return success();
}

LogicalResult refuseSplitExperts(ir::ModelOp model, StringRef passName) {
  WalkResult result = model.walk([&](ir::ExpertOp expert) {
    if (expert.getLowRank()) {
      expert.emitError() << passName << ": expert " << expert.getId()
                         << " is factored into a base and low-rank deltas by moe-factor-experts; run " << passName
                         << " before it";
      return WalkResult::interrupt();
    }
    if (!expert.getPartOffset())
      return WalkResult::advance();
    expert.emitError() << passName << ": expert " << expert.getId()
                       << " is split into parts by moe-allocate-bits granularity=micro-expert; run " << passName
                       << " before it";
    return WalkResult::interrupt();
  });
  return failure(result.wasInterrupted());
}

void renumberExpert(ir::ExpertOp expert, int64_t id) {
  if (static_cast<int64_t>(expert.getId()) == id)
    return;
  expert.setOrigin(static_cast<uint64_t>(expert.getOriginalId()));
  expert.setId(static_cast<uint64_t>(id));
}

/// Erases tensors no op references any more, with their FP8 scales.
void eraseUnusedTensors(ir::ModelOp model) {
  SmallVector<ir::TensorOp> candidates;
  for (ir::TensorOp tensor : model.getBody().getOps<ir::TensorOp>())
    if (!tensor.getSymName().ends_with("_scale_inv") && SymbolTable::symbolKnownUseEmpty(tensor, model))
      candidates.push_back(tensor);
  for (ir::TensorOp tensor : candidates) {
    std::string scale = (tensor.getSymName() + "_scale_inv").str();
    if (Operation *scaleOp = SymbolTable::lookupSymbolIn(model, StringAttr::get(model.getContext(), scale)))
      scaleOp->erase();
    tensor->erase();
  }
}

} // namespace moe
