//===- WeightStore.h - Append-only tensor file next to a module -*- C++ -*-===//
//
// Part of moec. Where passes write new tensors (sliced, merged, quantised).
// The file is a magic followed by self-contained records, each with its own
// checksum; records are only ever appended, and a later record with the
// same key replaces an earlier one.
//
// Several processes may use one store at once: writers hold an exclusive
// flock(2) while they read what others appended, choose a key and append
// at the end of the file, so no writer ever overwrites or cuts off another
// writer's record. A writer killed mid-record leaves a torn tail (a record
// cut short by the end of the file) that readers ignore and the next writer,
// holding the lock, cuts off. A complete record that fails its checksum is
// damage: opening or appending fails naming the record and its offset, and
// nothing is dropped or overwritten.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_FRONTEND_WEIGHTSTORE_H
#define MOE_FRONTEND_WEIGHTSTORE_H

#include "moe/Frontend/DType.h"
#include "moe/Support/Status.h"

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace moe {

/// One tensor in a WeightStore.
struct StoredTensor {
  std::string key;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t dataOffset = 0; ///< File offset of the bytes.
  uint64_t byteSize = 0;
};

class WeightStore {
public:
  /// Opens `path`, creating an empty store when it does not exist and
  /// `create` is set. A torn tail after the last complete record is ignored
  /// (and cut off by the next append).
  static Expected<std::unique_ptr<WeightStore>> open(const std::string &path, bool create);
  ~WeightStore();

  const std::string &path() const { return filePath; }
  /// Appends (or replaces) tensor `key`; durable when this returns.
  Status append(const std::string &key, DType dtype, std::vector<int64_t> shape, std::span<const uint8_t> bytes);
  /// Stores `bytes` under `name`, or under `name`.v2, .v3, ... when another
  /// writer's record holds other contents under that name, reusing a
  /// record with exactly these contents. The key is chosen and appended
  /// under the store's lock, so concurrent writers never share a key for
  /// different contents. Returns the key.
  Expected<std::string> put(const std::string &name, DType dtype, std::vector<int64_t> shape,
                            std::span<const uint8_t> bytes);
  /// The newest record of `key`, or null.
  const StoredTensor *find(const std::string &key) const;
  /// Every key, sorted.
  std::vector<std::string> keys() const;
  /// Reads the bytes of `tensor`.
  Status read(const StoredTensor &tensor, std::vector<uint8_t> &bytes) const;
  /// Reads tensor `key` converted to f32.
  Status loadF32(const std::string &key, std::vector<float> &out) const;
  /// Bytes after the last complete record when the store was opened.
  uint64_t ignoredTailBytes() const { return ignoredTail; }

private:
  WeightStore() = default;
  /// Reads the records in [validLength, end of file) into the index. A
  /// torn tail is left alone (cut = false) or cut off (cut = true, only
  /// while holding the exclusive lock); damage is an error.
  Status scanNewRecords(bool cut);
  Status appendLocked(const std::string &key, DType dtype, std::vector<int64_t> shape, std::span<const uint8_t> bytes);
  size_t recordCount = 0;
  std::string filePath;
  int descriptor = -1;
  uint64_t validLength = 0;
  uint64_t ignoredTail = 0;
  std::map<std::string, StoredTensor> index;
};

} // namespace moe

#endif // MOE_FRONTEND_WEIGHTSTORE_H
