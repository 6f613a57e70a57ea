//===- Checkpoint.cpp - A Hugging Face checkpoint directory ---------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Checkpoint.h"
#include "moe/Support/File.h"
#include "moe/Support/HugePages.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <sys/stat.h>

namespace moe {

using json = nlohmann::json;

namespace {

bool isDirectory(const std::string &path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

bool isFile(const std::string &path) {
  struct stat info;
  return stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

} // namespace

Expected<std::unique_ptr<Checkpoint>> Checkpoint::open(const std::string &directory) {
  if (!isDirectory(directory))
    return Status::error(directory, ": not a readable directory (expected a "
                                    "Hugging Face checkpoint directory)");
  std::unique_ptr<Checkpoint> checkpoint(new Checkpoint());
  checkpoint->root = directory;
  std::string indexPath = directory + "/model.safetensors.index.json";
  std::string singlePath = directory + "/model.safetensors";

  if (isFile(indexPath)) {
    checkpoint->sharded = true;
    Expected<std::string> text = readWholeFile(indexPath);
    if (!text)
      return text.status();
    json index = json::parse(*text, nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object())
      return Status::error(indexPath, ": not a JSON object");
    auto weightMap = index.find("weight_map");
    if (weightMap == index.end() || !weightMap->is_object())
      return Status::error(indexPath, ": missing object 'weight_map' (tensor -> shard)");
    std::map<std::string, SafetensorsFile *> shardByName;
    for (auto &[tensor, shardValue] : weightMap->items()) {
      if (!shardValue.is_string())
        return Status::error(indexPath, ": weight_map entry '", tensor, "' must name a shard file");
      std::string shard = shardValue.get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos)
        return Status::error(indexPath, ": weight_map entry '", tensor, "' names shard '", shard,
                             "'; expected a file name inside the directory");
      if (!shardByName.count(shard)) {
        std::string shardPath = directory + "/" + shard;
        if (!isFile(shardPath))
          return Status::error(indexPath, ": tensor '", tensor, "' is mapped to shard '", shard,
                               "', which does not exist in ", directory);
        Expected<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::open(shardPath);
        if (!file)
          return file.status();
        shardByName[shard] = file->get();
        checkpoint->files.push_back(file.take());
      }
      SafetensorsFile *file = shardByName[shard];
      const TensorInfo *info = file->find(tensor);
      if (!info)
        return Status::error(indexPath, ": tensor '", tensor, "' is mapped to shard '", shard,
                             "', but that shard does not contain it");
      checkpoint->locations[tensor] = TensorLocation{file, info};
    }
    // Tensors present in a shard but absent from the index are unreachable
    // for other loaders too; keep them out, as transformers does.
    std::sort(checkpoint->files.begin(), checkpoint->files.end(),
              [](const auto &a, const auto &b) { return a->path() < b->path(); });
  } else if (isFile(singlePath)) {
    Expected<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::open(singlePath);
    if (!file)
      return file.status();
    for (const TensorInfo &info : (*file)->tensors())
      checkpoint->locations[info.name] = TensorLocation{file->get(), &info};
    checkpoint->files.push_back(file.take());
  } else {
    return Status::error(directory, ": no model.safetensors or "
                                    "model.safetensors.index.json (only safetensors "
                                    "checkpoints are supported)");
  }
  return checkpoint;
}

std::vector<std::string> Checkpoint::tensorNames() const {
  std::vector<std::string> names;
  names.reserve(locations.size());
  for (const auto &[name, location] : locations)
    names.push_back(name);
  return names;
}

const TensorLocation *Checkpoint::find(std::string_view name) const {
  auto it = locations.find(name);
  return it == locations.end() ? nullptr : &it->second;
}

void applyFp8BlockScales(float *matrix, int64_t firstRow, int64_t rows, int64_t cols, const float *scales) {
  int64_t scaleCols = (cols + kFp8BlockSize - 1) / kFp8BlockSize;
  for (int64_t r = 0; r < rows; ++r) {
    const float *scaleRow = scales + ((firstRow + r) / kFp8BlockSize) * scaleCols;
    float *row = matrix + r * cols;
    // Column blocks outermost so the inner loop is a plain vector multiply.
    for (int64_t block = 0; block < scaleCols; ++block) {
      float scale = scaleRow[block];
      int64_t end = std::min(cols, (block + 1) * kFp8BlockSize);
      for (int64_t c = block * kFp8BlockSize; c < end; ++c)
        row[c] *= scale;
    }
  }
}

namespace {

/// The f32 block scales of FP8 tensor `name`, or an empty vector when it
/// needs none (not FP8, or FP8 without a `_scale_inv` sibling).
Status loadBlockScales(const Checkpoint &checkpoint, std::string_view name, const TensorLocation &location,
                       std::vector<float> &scales) {
  scales.clear();
  const TensorInfo &info = *location.info;
  if (info.dtype != DType::F8E4M3 && info.dtype != DType::F8E5M2)
    return Status::success();
  std::string scaleName = concat(name, kScaleInvSuffix);
  const TensorLocation *scale = checkpoint.find(scaleName);
  if (!scale)
    return Status::success(); // FP8 without block scales
  if (info.shape.size() != 2)
    return Status::error(location.file->path(), ": tensor '", name, "' has block scales but shape ",
                         formatShape(info.shape), "; expected a matrix");
  std::vector<int64_t> expected = {(info.shape[0] + kFp8BlockSize - 1) / kFp8BlockSize,
                                   (info.shape[1] + kFp8BlockSize - 1) / kFp8BlockSize};
  if (scale->info->shape != expected)
    return Status::error(scale->file->path(), ": tensor '", scaleName, "' has shape ", formatShape(scale->info->shape),
                         ", expected ", formatShape(expected), " for the ", kFp8BlockSize, "x", kFp8BlockSize,
                         " blocks of '", name, "' ", formatShape(info.shape));
  scales.resize(static_cast<size_t>(numElements(expected)));
  return convertToF32(scale->info->dtype, scale->bytes().data(), scales.size(), scales.data())
      .withContext(concat(scale->file->path(), ": tensor '", scaleName, "'"));
}

} // namespace

Status Checkpoint::locateWithScales(std::string_view name, const TensorLocation *&location,
                                    std::vector<float> &scales) const {
  location = find(name);
  if (!location)
    return Status::error(root, ": tensor '", name, "' not found");
  return loadBlockScales(*this, name, *location, scales);
}

Status Checkpoint::loadF32(std::string_view name, std::vector<float> &out) const {
  const TensorLocation *location = nullptr;
  std::vector<float> scales;
  MOE_RETURN_IF_ERROR(locateWithScales(name, location, scales));
  const TensorInfo &info = *location->info;
  resizeLarge(out, static_cast<size_t>(info.numElements()));
  MOE_RETURN_IF_ERROR(convertToF32(info.dtype, location->bytes().data(), out.size(), out.data())
                          .withContext(concat(location->file->path(), ": tensor '", name, "'")));
  if (!scales.empty())
    applyFp8BlockScales(out.data(), 0, info.shape[0], info.shape[1], scales.data());
  return Status::success();
}

Status Checkpoint::streamF32(std::string_view name, int64_t rowsPerChunk, const RowChunkConsumer &consumer) const {
  const TensorLocation *location = nullptr;
  std::vector<float> scales;
  MOE_RETURN_IF_ERROR(locateWithScales(name, location, scales));
  const TensorInfo &info = *location->info;
  int64_t rows = info.shape.empty() || info.shape.size() == 1 ? 1 : info.shape[0];
  int64_t rowElements = rows == 0 ? 0 : info.numElements() / rows;
  rowsPerChunk = std::max<int64_t>(1, std::min(rowsPerChunk, rows));
  std::vector<float> buffer(static_cast<size_t>(rowsPerChunk * rowElements));
  const uint8_t *bytes = location->bytes().data();
  const size_t elementBytes = dtypeBytes(info.dtype);
  for (int64_t first = 0; first < rows; first += rowsPerChunk) {
    int64_t count = std::min(rowsPerChunk, rows - first);
    MOE_RETURN_IF_ERROR(convertToF32(info.dtype, bytes + first * rowElements * elementBytes,
                                     static_cast<size_t>(count * rowElements), buffer.data())
                            .withContext(concat(location->file->path(), ": tensor '", name, "'")));
    if (!scales.empty())
      applyFp8BlockScales(buffer.data(), first, count, rowElements, scales.data());
    MOE_RETURN_IF_ERROR(consumer(first, count, buffer.data()));
  }
  return Status::success();
}

} // namespace moe
