//===- Safetensors.h - Validated, memory-mapped safetensors files -*- C++ -*-===//
//
// Part of moec. Reads safetensors files through mmap with zero-copy tensor
// views after validating the whole header, and writes them deterministically.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_FRONTEND_SAFETENSORS_H
#define MOE_FRONTEND_SAFETENSORS_H

#include "moe/Frontend/DType.h"
#include "moe/Support/AtomicFile.h"
#include "moe/Support/MappedFile.h"
#include "moe/Support/Status.h"

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

/// Largest header the reader accepts (the reference implementation's limit).
constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

/// Product of `shape`; 1 for a scalar.
int64_t numElements(std::span<const int64_t> shape);
/// "[a, b, c]".
std::string formatShape(std::span<const int64_t> shape);

/// One tensor entry of a safetensors header.
struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t dataBegin = 0; ///< Offset from the start of the data buffer.
  uint64_t dataEnd = 0;   ///< One past the last byte.

  int64_t numElements() const { return moe::numElements(shape); }
  uint64_t byteSize() const { return dataEnd - dataBegin; }
};

/// The parsed and validated header of a safetensors file.
struct SafetensorsHeader {
  /// Tensors sorted by name.
  std::vector<TensorInfo> tensors;
  /// The `__metadata__` map, empty when absent.
  std::map<std::string, std::string> metadata;
  /// File offset of the data buffer (8 + header length).
  uint64_t dataOffset = 0;

  /// The tensor called `name`, or null.
  const TensorInfo *find(std::string_view name) const;
};

/// Parses and fully validates the header of a safetensors file whose first
/// `fileSize` bytes are at `file`: header length bounds, a JSON object with
/// valid entries, known dtypes, sizes matching shapes, no duplicate names,
/// and data offsets tiling the data buffer exactly. `fileName` is used in
/// messages only.
Expected<SafetensorsHeader> parseSafetensorsHeader(const uint8_t *file, uint64_t fileSize, std::string_view fileName);

/// A read-only, memory-mapped safetensors file.
class SafetensorsFile {
public:
  /// Opens, maps and validates `path`.
  static Expected<std::unique_ptr<SafetensorsFile>> open(const std::string &path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile &) = delete;
  SafetensorsFile &operator=(const SafetensorsFile &) = delete;

  const std::string &path() const { return filePath; }
  uint64_t fileSize() const { return mapping->size(); }
  const std::vector<TensorInfo> &tensors() const { return header.tensors; }
  const std::map<std::string, std::string> &metadata() const { return header.metadata; }
  const TensorInfo *find(std::string_view name) const { return header.find(name); }
  /// The bytes of `tensor` inside the mapping (no copy; any alignment).
  std::span<const uint8_t> data(const TensorInfo &tensor) const;
  /// Drops this process's mapping of the whole pages inside `tensor`'s bytes
  /// (they stay in the page cache and are read again on next use), so that
  /// streaming through a large checkpoint does not grow the resident set.
  void releasePages(const TensorInfo &tensor) const;

private:
  SafetensorsFile() = default;
  std::string filePath;
  std::unique_ptr<MappedFile> mapping;
  SafetensorsHeader header;
};

/// Builds a safetensors file in memory and writes it deterministically:
/// tensors ordered by element size (widest first) then by name, so every
/// tensor is naturally aligned, the data buffer starting on a 64-byte
/// boundary, header keys sorted. The output is written to a temporary name
/// and renamed, so a failed write leaves no partial file.
class SafetensorsWriter {
public:
  SafetensorsWriter() = default;
  SafetensorsWriter(const SafetensorsWriter &) = delete; // views point into entries
  SafetensorsWriter &operator=(const SafetensorsWriter &) = delete;
  /// Adds a tensor; `bytes` must hold exactly prod(shape) elements.
  Status addTensor(std::string name, DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes);
  /// Adds a tensor whose bytes stay where they are (they must outlive
  /// write()): large statistics are written without a copy.
  Status addTensorView(std::string name, DType dtype, std::vector<int64_t> shape, std::span<const uint8_t> bytes);
  /// Adds an f32 tensor converted to `dtype` (F32, F16 or BF16).
  Status addF32Tensor(std::string name, DType dtype, std::vector<int64_t> shape, std::span<const float> values);
  void setMetadata(std::string key, std::string value);
  /// Serialises everything to one buffer.
  std::vector<uint8_t> serialize() const;
  /// Writes to `path` (through `path`.tmp and a rename), tensor by tensor.
  Status write(const std::string &path) const;

private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> owned; ///< Empty for views.
    std::span<const uint8_t> bytes;
  };
  /// The header (into `head`) and the data, in file order.
  std::vector<std::span<const uint8_t>> layout(std::string &head) const;
  std::map<std::string, Entry> entries;
  std::map<std::string, std::string> metadata;
};

/// Copies 2-D piece `slice` = {index, firstRow, rows, transposed} of the 3-D
/// [N, A, B] tensor `tensor` of `file` (fused experts): rows
/// firstRow .. firstRow+rows-1 of matrix `index`, or of its transpose when
/// `transposed` is 1, into `bytes` in the tensor's dtype.
Status readTensorSlice(const SafetensorsFile &file, const TensorInfo &tensor, std::span<const int64_t> slice,
                       std::vector<uint8_t> &bytes);

} // namespace moe

#endif // MOE_FRONTEND_SAFETENSORS_H
