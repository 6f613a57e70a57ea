//===- Checkpoint.cpp - A Hugging Face checkpoint directory ---------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Checkpoint.h"

#include <nlohmann/json.hpp>

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

Expected<std::unique_ptr<Checkpoint>>
Checkpoint::open(const std::string &directory) {
  if (!isDirectory(directory))
    return Status::error(directory, ": not a readable directory (expected a "
                                    "Hugging Face checkpoint directory)");
  std::unique_ptr<Checkpoint> checkpoint(new Checkpoint());
  checkpoint->root = directory;
  std::string indexPath = directory + "/model.safetensors.index.json";
  std::string singlePath = directory + "/model.safetensors";

  if (isFile(indexPath)) {
    checkpoint->sharded = true;
    std::ifstream stream(indexPath);
    std::stringstream text;
    text << stream.rdbuf();
    if (!stream)
      return Status::error(indexPath, ": cannot read: ", std::strerror(errno));
    json index = json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object())
      return Status::error(indexPath, ": not a JSON object");
    auto weightMap = index.find("weight_map");
    if (weightMap == index.end() || !weightMap->is_object())
      return Status::error(indexPath,
                           ": missing object 'weight_map' (tensor -> shard)");
    std::map<std::string, SafetensorsFile *> shardByName;
    for (auto &[tensor, shardValue] : weightMap->items()) {
      if (!shardValue.is_string())
        return Status::error(indexPath, ": weight_map entry '", tensor,
                             "' must name a shard file");
      std::string shard = shardValue.get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos)
        return Status::error(indexPath, ": weight_map entry '", tensor,
                             "' names shard '", shard,
                             "'; expected a file name inside the directory");
      if (!shardByName.count(shard)) {
        std::string shardPath = directory + "/" + shard;
        if (!isFile(shardPath))
          return Status::error(indexPath, ": tensor '", tensor,
                               "' is mapped to shard '", shard,
                               "', which does not exist in ", directory);
        Expected<std::unique_ptr<SafetensorsFile>> file =
            SafetensorsFile::open(shardPath);
        if (!file)
          return file.status();
        shardByName[shard] = file->get();
        checkpoint->files.push_back(file.take());
      }
      SafetensorsFile *file = shardByName[shard];
      const TensorInfo *info = file->find(tensor);
      if (!info)
        return Status::error(indexPath, ": tensor '", tensor,
                             "' is mapped to shard '", shard,
                             "', but that shard does not contain it");
      checkpoint->locations[tensor] = TensorLocation{file, info};
    }
    // Tensors present in a shard but absent from the index are unreachable
    // for other loaders too; keep them out, as transformers does.
    std::sort(checkpoint->files.begin(), checkpoint->files.end(),
              [](const auto &a, const auto &b) { return a->path() < b->path(); });
  } else if (isFile(singlePath)) {
    Expected<std::unique_ptr<SafetensorsFile>> file =
        SafetensorsFile::open(singlePath);
    if (!file)
      return file.status();
    for (const TensorInfo &info : (*file)->tensors())
      checkpoint->locations[info.name] = TensorLocation{file->get(), &info};
    checkpoint->files.push_back(file.take());
  } else {
    return Status::error(directory,
                         ": no model.safetensors or "
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

void applyFp8BlockScales(float *matrix, int64_t rows, int64_t cols,
                         const float *scales) {
  int64_t scaleCols = (cols + kFp8BlockSize - 1) / kFp8BlockSize;
  for (int64_t r = 0; r < rows; ++r) {
    const float *scaleRow = scales + (r / kFp8BlockSize) * scaleCols;
    float *row = matrix + r * cols;
    for (int64_t c = 0; c < cols; ++c)
      row[c] *= scaleRow[c / kFp8BlockSize];
  }
}

Status Checkpoint::loadF32(std::string_view name, std::vector<float> &out) const {
  const TensorLocation *location = find(name);
  if (!location)
    return Status::error(root, ": tensor '", name, "' not found");
  const TensorInfo &info = *location->info;
  out.resize(static_cast<size_t>(info.numElements()));
  MOE_RETURN_IF_ERROR(
      convertToF32(info.dtype, location->bytes().data(), out.size(), out.data())
          .withContext(concat(location->file->path(), ": tensor '", name, "'")));
  if (info.dtype != DType::F8E4M3 && info.dtype != DType::F8E5M2)
    return Status::success();

  std::string scaleName = concat(name, kScaleInvSuffix);
  const TensorLocation *scale = find(scaleName);
  if (!scale)
    return Status::success(); // A per-tensor-unscaled FP8 tensor.
  if (info.shape.size() != 2)
    return Status::error(location->file->path(), ": tensor '", name,
                         "' has block scales but shape ",
                         formatShape(info.shape), "; expected a matrix");
  int64_t rows = info.shape[0], cols = info.shape[1];
  std::vector<int64_t> expected = {(rows + kFp8BlockSize - 1) / kFp8BlockSize,
                                   (cols + kFp8BlockSize - 1) / kFp8BlockSize};
  if (scale->info->shape != expected)
    return Status::error(scale->file->path(), ": tensor '", scaleName,
                         "' has shape ", formatShape(scale->info->shape),
                         ", expected ", formatShape(expected), " for the ",
                         kFp8BlockSize, "x", kFp8BlockSize, " blocks of '",
                         name, "' ", formatShape(info.shape));
  std::vector<float> scales(static_cast<size_t>(numElements(expected)));
  MOE_RETURN_IF_ERROR(convertToF32(scale->info->dtype, scale->bytes().data(),
                                   scales.size(), scales.data())
                          .withContext(concat(scale->file->path(), ": tensor '",
                                              scaleName, "'")));
  applyFp8BlockScales(out.data(), rows, cols, scales.data());
  return Status::success();
}

} // namespace moe
