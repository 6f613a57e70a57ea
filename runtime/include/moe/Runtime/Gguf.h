//===- Gguf.h - GGUF files (llama.cpp's model container) --------*- C++ -*-===//
//
// Part of moec. The GGUF container, version 3, written from the public
// specification (ggml's docs/gguf.md): a header ("GGUF", version, tensor
// and key-value counts), typed key-values, tensor infos (name, dimensions
// ne[0] innermost, ggml type, offset), then the tensor data, each tensor
// at a multiple of general.alignment (32 unless a key says otherwise).
//
// The writer streams: the header is written from the declared tensors,
// then each tensor's bytes are asked for in order, so an export never holds
// more than one tensor in memory; the file appears under its name only when
// complete (AtomicFile). The reader maps the file and validates all of it
// once, at open: bounds of every string, array and tensor, known types,
// rows that are whole blocks, aligned and non-overlapping data, no
// duplicate names or keys; anything else is an error naming the file, the
// field and what was expected.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_GGUF_H
#define MOE_RUNTIME_GGUF_H

#include "common/GgmlFormats.h"
#include "moe/Frontend/ModelSpec.h"
#include "moe/Support/MappedFile.h"
#include "moe/Support/Status.h"

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace moe {

enum class GgufType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  Bool = 7,
  String = 8,
  Array = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};

/// One key's value: a scalar (integers in `integer`, floats in `real`), a
/// string, or an array of one scalar type or of strings.
struct GgufValue {
  GgufType type = GgufType::U32;
  GgufType elementType = GgufType::U32; ///< Arrays only.
  int64_t integer = 0;                  ///< Integer types and Bool (U64 above 2^63 is refused).
  double real = 0;
  std::string text;
  std::vector<int64_t> integers; ///< Integer (and Bool) arrays.
  std::vector<double> reals;     ///< Float arrays.
  std::vector<std::string> strings;

  static GgufValue u32(uint32_t value);
  static GgufValue i32(int32_t value);
  static GgufValue u64(uint64_t value);
  static GgufValue f32(float value);
  static GgufValue boolean(bool value);
  static GgufValue string(std::string value);
  static GgufValue stringArray(std::vector<std::string> values);
  static GgufValue i32Array(std::vector<int64_t> values);
  static GgufValue f32Array(std::vector<double> values);
  /// Size of an array (0 for scalars).
  size_t size() const;
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne; ///< ne[0] is the innermost (row) dimension.
  quant::GgmlType type = quant::GgmlType::F32;
  uint64_t offset = 0; ///< From the start of the data section.
  uint64_t bytes = 0;
  int64_t elements() const;
};

/// Bytes of a tensor of `type` with dimensions `ne`, or an error when its
/// rows are not whole blocks.
Expected<uint64_t> ggufTensorBytes(quant::GgmlType type, const std::vector<int64_t> &ne);

class GgufWriter {
public:
  /// Keys are written in the order they are first set.
  void set(const std::string &key, GgufValue value);
  /// Declares a tensor; its bytes come from the producer given to write().
  Status addTensor(std::string name, std::vector<int64_t> ne, quant::GgmlType type);
  /// Fills `bytes` with tensor `index` (in addTensor order).
  using Producer = std::function<Status(size_t index, std::vector<uint8_t> &bytes)>;
  /// Writes the file; checks each produced tensor's size.
  Status write(const std::string &path, const Producer &produce) const;
  const std::vector<GgufTensorInfo> &tensors() const { return infos; }

private:
  std::vector<std::pair<std::string, GgufValue>> keys;
  std::vector<GgufTensorInfo> infos;
};

class GgufFile {
public:
  static Expected<std::unique_ptr<GgufFile>> open(const std::string &path);

  const std::string &path() const { return filePath; }
  uint32_t version() const { return fileVersion; }
  const std::vector<std::pair<std::string, GgufValue>> &keys() const { return keyValues; }
  const GgufValue *find(const std::string &key) const;
  const std::vector<GgufTensorInfo> &tensors() const { return infos; }
  const GgufTensorInfo *tensor(const std::string &name) const;
  /// The tensor's bytes in the mapped file.
  const uint8_t *data(const GgufTensorInfo &tensor) const { return dataStart + tensor.offset; }
  /// Where the tensor's bytes start, from the start of the file.
  uint64_t fileOffset(const GgufTensorInfo &tensor) const;

private:
  std::string filePath;
  uint32_t fileVersion = 0;
  std::unique_ptr<MappedFile> mapping;
  const uint8_t *dataStart = nullptr;
  std::vector<std::pair<std::string, GgufValue>> keyValues;
  std::map<std::string, size_t> keyIndex;
  std::vector<GgufTensorInfo> infos;
  std::map<std::string, size_t> tensorIndex;
};

/// llama.cpp's tensor name of a moec role ("attn_q.weight"; after "blk.N."
/// for layer roles), or null for the routed experts' roles (stacked).
const char *ggufRoleName(TensorRole role);

} // namespace moe

#endif // MOE_RUNTIME_GGUF_H
