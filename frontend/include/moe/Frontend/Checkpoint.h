//===- Checkpoint.h - A Hugging Face checkpoint directory -------*- C++ -*-===//
//
// Part of moec. The safetensors shards of a checkpoint directory, single-file
// or sharded through model.safetensors.index.json, with name lookup across
// shards and conversion to f32 (including FP8 weights with block scales).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_FRONTEND_CHECKPOINT_H
#define MOE_FRONTEND_CHECKPOINT_H

#include "moe/Frontend/Safetensors.h"

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace moe {

/// Where a tensor's bytes are: a shard and its header entry.
struct TensorLocation {
  const SafetensorsFile *file = nullptr;
  const TensorInfo *info = nullptr;
  std::span<const uint8_t> bytes() const { return file->data(*info); }
};

/// Suffix of the sibling tensor that holds the block scales of an FP8 weight.
constexpr std::string_view kScaleInvSuffix = "_scale_inv";
/// Side of the square blocks of DeepSeek-V3 FP8 weight scales.
constexpr int64_t kFp8BlockSize = 128;

/// The weights of one checkpoint directory.
class Checkpoint {
public:
  /// Opens `directory`: through model.safetensors.index.json when present
  /// (every shard it names must exist and hold the tensors mapped to it),
  /// else model.safetensors.
  static Expected<std::unique_ptr<Checkpoint>> open(const std::string &directory);

  const std::string &directory() const { return root; }
  /// Path of config.json inside the directory.
  std::string configPath() const { return root + "/config.json"; }
  /// Shards in the order of their file names.
  const std::vector<std::unique_ptr<SafetensorsFile>> &shards() const { return files; }
  /// True when the tensors come from an index file.
  bool isSharded() const { return sharded; }
  /// Every tensor name, sorted.
  std::vector<std::string> tensorNames() const;
  size_t tensorCount() const { return locations.size(); }
  /// The tensor called `name`, or null.
  const TensorLocation *find(std::string_view name) const;

  /// Converts tensor `name` to f32 into `out` (resized to its element
  /// count). An F8_E4M3/F8_E5M2 tensor with a `<name>_scale_inv` sibling
  /// (in any shard) is dequantised block-wise: W[r,c] * scale[r/128, c/128].
  Status loadF32(std::string_view name, std::vector<float> &out) const;

  /// Receives rows [firstRow, firstRow + rowCount) of a tensor as f32.
  using RowChunkConsumer = std::function<Status(int64_t firstRow, int64_t rowCount, const float *rows)>;
  /// Streams tensor `name` to `consumer` in chunks of at most `rowsPerChunk`
  /// rows (dimension 0; a 1-D tensor is one row), converted to f32 and
  /// dequantised like loadF32, through one reused buffer: peak memory is one
  /// chunk, not the tensor. A failure of `consumer` stops the stream.
  Status streamF32(std::string_view name, int64_t rowsPerChunk, const RowChunkConsumer &consumer) const;

private:
  /// Finds tensor `name` and, for FP8 with a `_scale_inv` sibling, its
  /// f32 block scales (empty otherwise).
  Status locateWithScales(std::string_view name, const TensorLocation *&location, std::vector<float> &scales) const;

  std::string root;
  bool sharded = false;
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, TensorLocation, std::less<>> locations;
};

/// Multiplies rows [firstRow, firstRow + rows) of a matrix with `cols`
/// columns, stored at `matrix`, in place by its FP8 block scales `scales` of
/// shape [ceil(totalRows/128), ceil(cols/128)].
void applyFp8BlockScales(float *matrix, int64_t firstRow, int64_t rows, int64_t cols, const float *scales);

} // namespace moe

#endif // MOE_FRONTEND_CHECKPOINT_H
