//===- TensorAccess.cpp - Bytes behind moe.tensor symbols -----------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Transforms/TensorAccess.h"

#include <cstring>

namespace moe {

Status TensorAccess::read(ir::TensorOp tensor, DType &dtype, std::vector<uint8_t> &bytes) {
  std::string key = tensor.getKey().str();
  if (std::optional<int64_t> source = tensor.getSource()) {
    auto &file = sources[*source];
    if (!file) {
      std::string path = llvm::cast<mlir::StringAttr>(model.getSources()[*source]).getValue().str();
      Expected<std::unique_ptr<SafetensorsFile>> opened = SafetensorsFile::open(path);
      if (!opened)
        return opened.status();
      file = opened.take();
    }
    const TensorInfo *info = file->find(key);
    if (!info)
      return Status::error(file->path(), ": tensor '", key, "' not found");
    dtype = info->dtype;
    std::span<const uint8_t> data = file->data(*info);
    std::optional<llvm::ArrayRef<int64_t>> slice = tensor.getSlice();
    if (!slice) {
      bytes.assign(data.begin(), data.end());
      return Status::success();
    }
    // Rows of one matrix of a 3-D [N, A, B] tensor (or of its transpose).
    if (info->shape.size() != 3)
      return Status::error(file->path(), ": tensor '", key, "' has shape ", formatShape(info->shape),
                           "; a slice needs a 3-D tensor");
    const int64_t index = (*slice)[0], first = (*slice)[1], rows = (*slice)[2];
    const bool transposed = (*slice)[3] == 1;
    const int64_t A = info->shape[1], B = info->shape[2];
    const int64_t rowLength = transposed ? A : B, available = transposed ? B : A;
    if (index >= info->shape[0] || first + rows > available)
      return Status::error(file->path(), ": tensor '", key, "' ", formatShape(info->shape),
                           " has no slice [", index, ", ", first, ", ", rows, "]");
    const size_t element = dtypeBytes(info->dtype);
    const uint8_t *matrix = data.data() + static_cast<size_t>(index * A * B) * element;
    bytes.resize(static_cast<size_t>(rows * rowLength) * element);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < rowLength; ++c) {
        int64_t stored = transposed ? c * B + (first + r) : (first + r) * B + c;
        std::memcpy(bytes.data() + static_cast<size_t>(r * rowLength + c) * element,
                    matrix + static_cast<size_t>(stored) * element, element);
      }
    return Status::success();
  }
  Expected<WeightStore *> opened = store();
  if (!opened)
    return opened.status();
  const StoredTensor *stored = (*opened)->find(key);
  if (!stored)
    return Status::error((*opened)->path(), ": tensor '", key, "' not in the weight store");
  dtype = stored->dtype;
  return (*opened)->read(*stored, bytes);
}

Expected<WeightStore *> TensorAccess::store() {
  if (weightStore)
    return weightStore.get();
  std::optional<llvm::StringRef> path = model.getStore();
  if (!path)
    return Status::error("moe.model @", model.getSymName().str(),
                         " has no WeightStore (set its `store` path) for the tensors passes write");
  Expected<std::unique_ptr<WeightStore>> opened = WeightStore::open(path->str(), /*create=*/true);
  if (!opened)
    return opened.status();
  weightStore = opened.take();
  return weightStore.get();
}

} // namespace moe
