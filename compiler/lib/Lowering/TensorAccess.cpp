//===- TensorAccess.cpp - Bytes behind moe.tensor symbols -----------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Lowering/TensorAccess.h"
#include "moe/Support/HugePages.h"

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
      copyLarge(bytes, data.data(), data.size());
      return Status::success();
    }
    return readTensorSlice(*file, *info, std::span<const int64_t>(slice->data(), slice->size()), bytes);
  }
  Expected<WeightStore *> opened = store();
  if (!opened)
    return opened.status();
  const StoredTensor *stored = (*opened)->find(key);
  if (!stored)
    return Status::error((*opened)->path(), ": tensor '", key, "' not in the weight store (it holds ",
                         (*opened)->keys().size(),
                         " tensors); the module belongs with another store: was the store "
                         "replaced, or the module moved without it?");
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
