//===- WeightStore.cpp - Append-only tensor file next to a module ---------===//
//
// Part of moec. Layout: "MOESTOR1", then records:
//   u32 magic "TREC" | u32 header length H | H bytes of JSON
//   {"key", "dtype", "shape", "bytes"} | zero padding to a multiple of 64 |
//   data | u64 XXH64 of (header JSON, data).
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/WeightStore.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Support/HugePages.h"

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moe {

namespace {

constexpr char kFileMagic[8] = {'M', 'O', 'E', 'S', 'T', 'O', 'R', '1'};
constexpr uint32_t kRecordMagic = 0x43455254; // "TREC" little-endian
constexpr uint64_t kAlignment = 64;

uint64_t alignUp(uint64_t value) { return (value + kAlignment - 1) / kAlignment * kAlignment; }

bool readAt(int descriptor, uint64_t offset, void *buffer, size_t size) {
  auto *bytes = static_cast<uint8_t *>(buffer);
  while (size > 0) {
    ssize_t n = pread(descriptor, bytes, size, static_cast<off_t>(offset));
    if (n <= 0)
      return false;
    bytes += n;
    offset += static_cast<uint64_t>(n);
    size -= static_cast<size_t>(n);
  }
  return true;
}

/// XXH64 of a record's header JSON followed by its data.
uint64_t recordChecksum(const std::string &headerText, const uint8_t *data, size_t size) {
  XXH64_state_t *state = XXH64_createState();
  XXH64_reset(state, 0);
  XXH64_update(state, headerText.data(), headerText.size());
  XXH64_update(state, data, size);
  uint64_t digest = XXH64_digest(state);
  XXH64_freeState(state);
  return digest;
}

bool writeAll(int descriptor, const uint8_t *bytes, size_t size) {
  while (size > 0) {
    ssize_t n = ::write(descriptor, bytes, size);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return false;
    bytes += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

/// Holds flock(2) on a descriptor for a scope.
class FileLock {
public:
  FileLock(int descriptor, int operation) : descriptor(descriptor) {
    while (::flock(descriptor, operation) != 0 && errno == EINTR) {
    }
  }
  ~FileLock() { ::flock(descriptor, LOCK_UN); }
  FileLock(const FileLock &) = delete;
  FileLock &operator=(const FileLock &) = delete;

private:
  int descriptor;
};

/// What reading one record at an offset found.
enum class RecordState { Valid, Torn, Damaged };

struct RecordRead {
  RecordState state = RecordState::Valid;
  StoredTensor tensor;
  uint64_t end = 0;
  std::string problem; ///< Why a record is damaged.
};

/// Reads the record at `offset` of a file of `size` bytes. A record cut
/// short by the end of the file is torn (what a killed writer leaves); a
/// complete record that does not parse or fails its checksum is damaged.
RecordRead readRecord(int descriptor, uint64_t offset, uint64_t size) {
  RecordRead out;
  auto torn = [&] {
    out.state = RecordState::Torn;
    return out;
  };
  auto damaged = [&](std::string problem) {
    out.state = RecordState::Damaged;
    out.problem = std::move(problem);
    return out;
  };
  uint32_t head[2];
  if (offset + 8 > size)
    return torn();
  if (!readAt(descriptor, offset, head, sizeof(head)))
    return damaged("cannot be read");
  if (head[0] != kRecordMagic)
    return damaged("does not start with the record magic");
  const uint64_t headerEnd = offset + 8 + head[1];
  if (head[1] > (1u << 20))
    return damaged(concat("declares a ", head[1], "-byte header"));
  if (headerEnd > size)
    return torn();
  std::string headerText(head[1], '\0');
  if (!readAt(descriptor, offset + 8, headerText.data(), headerText.size()))
    return damaged("cannot be read");
  nlohmann::json header = nlohmann::json::parse(headerText, nullptr, false);
  if (header.is_discarded() || !header.is_object() || !header.contains("key") || !header["key"].is_string() ||
      !header.contains("dtype") || !header["dtype"].is_string() || !header.contains("shape") ||
      !header["shape"].is_array() || !header.contains("bytes") || !header["bytes"].is_number_unsigned())
    return damaged("has a malformed header");
  StoredTensor &tensor = out.tensor;
  tensor.key = header["key"].get<std::string>();
  std::optional<DType> dtype = parseDType(header["dtype"].get<std::string>());
  if (!dtype)
    return damaged("has an unknown dtype");
  tensor.dtype = *dtype;
  for (const auto &dim : header["shape"]) {
    if (!dim.is_number_unsigned() || dim.get<uint64_t>() > (uint64_t(1) << 40))
      return damaged("has a malformed shape");
    tensor.shape.push_back(dim.get<int64_t>());
  }
  tensor.byteSize = header["bytes"].get<uint64_t>();
  tensor.dataOffset = alignUp(headerEnd);
  if (tensor.byteSize > size ||
      tensor.byteSize != static_cast<uint64_t>(numElements(tensor.shape)) * dtypeBytes(tensor.dtype))
    return damaged("declares a byte count its shape does not need");
  out.end = tensor.dataOffset + tensor.byteSize + 8;
  if (out.end > size)
    return torn();
  std::vector<uint8_t> data(tensor.byteSize);
  uint64_t stored = 0;
  if (!readAt(descriptor, tensor.dataOffset, data.data(), data.size()) ||
      !readAt(descriptor, tensor.dataOffset + tensor.byteSize, &stored, 8))
    return damaged("cannot be read");
  if (recordChecksum(headerText, data.data(), data.size()) != stored)
    return damaged("fails its checksum");
  return out;
}

/// Whether a valid record starts anywhere in (offset, size): a record
/// "cut short by the end of the file" with valid records after it is a
/// damaged length field, not a torn tail.
bool validRecordAfter(int descriptor, uint64_t offset, uint64_t size) {
  constexpr size_t kChunk = 1 << 20;
  std::vector<uint8_t> buffer(kChunk + 3);
  const uint8_t magic[4] = {'T', 'R', 'E', 'C'};
  for (uint64_t at = offset + 1; at + 4 <= size; at += kChunk) {
    const size_t length = static_cast<size_t>(std::min<uint64_t>(kChunk + 3, size - at));
    if (!readAt(descriptor, at, buffer.data(), length))
      return false;
    for (size_t i = 0; i + 4 <= length; ++i)
      if (std::memcmp(buffer.data() + i, magic, 4) == 0 &&
          readRecord(descriptor, at + i, size).state == RecordState::Valid)
        return true;
  }
  return false;
}

} // namespace

Status WeightStore::scanNewRecords(bool cut) {
  struct stat info;
  if (fstat(descriptor, &info) != 0)
    return Status::error(filePath, ": cannot stat weight store: ", std::strerror(errno));
  const uint64_t size = static_cast<uint64_t>(info.st_size);
  uint64_t offset = validLength;
  while (offset < size) {
    RecordRead record = readRecord(descriptor, offset, size);
    if (record.state == RecordState::Torn && validRecordAfter(descriptor, offset, size))
      record = RecordRead{RecordState::Damaged, {}, 0, "declares a length past the end of the file"};
    if (record.state == RecordState::Damaged)
      return Status::error(filePath, ": record ", recordCount, " at offset ", offset, " ", record.problem,
                           "; the weight store is damaged (", size - offset,
                           " bytes from there on are not read, and nothing is appended). Restore it from a "
                           "copy, or import the model again");
    if (record.state == RecordState::Torn) {
      if (cut && ftruncate(descriptor, static_cast<off_t>(offset)) != 0)
        return Status::error(filePath, ": cannot cut the torn tail a killed writer left: ", std::strerror(errno));
      ignoredTail = cut ? 0 : size - offset;
      return Status::success();
    }
    index[record.tensor.key] = std::move(record.tensor);
    ++recordCount;
    offset = record.end;
    validLength = offset;
  }
  ignoredTail = 0;
  return Status::success();
}

Expected<std::unique_ptr<WeightStore>> WeightStore::open(const std::string &path, bool create) {
  std::unique_ptr<WeightStore> store(new WeightStore());
  store->filePath = path;
  store->descriptor = ::open(path.c_str(), O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0644);
  if (store->descriptor < 0)
    return Status::error(path, ": cannot open weight store: ", std::strerror(errno));
  struct stat info;
  if (fstat(store->descriptor, &info) != 0 || !S_ISREG(info.st_mode))
    return Status::error(path, ": not a regular file; a weight store is a file");
  if (info.st_size == 0) {
    // Two creators may race: the one holding the lock writes the magic.
    FileLock lock(store->descriptor, LOCK_EX);
    if (fstat(store->descriptor, &info) == 0 && info.st_size == 0 &&
        (!writeAll(store->descriptor, reinterpret_cast<const uint8_t *>(kFileMagic), sizeof(kFileMagic)) ||
         fsync(store->descriptor) != 0))
      return Status::error(path, ": cannot initialise weight store: ", std::strerror(errno));
  }
  FileLock lock(store->descriptor, LOCK_SH);
  char magic[8];
  if (fstat(store->descriptor, &info) != 0 || static_cast<uint64_t>(info.st_size) < sizeof(magic) ||
      !readAt(store->descriptor, 0, magic, sizeof(magic)) || std::memcmp(magic, kFileMagic, sizeof(magic)) != 0)
    return Status::error(path, ": not a moec weight store (bad magic; expected \"MOESTOR1\")");
  store->validLength = sizeof(kFileMagic);
  MOE_RETURN_IF_ERROR(store->scanNewRecords(/*cut=*/false));
  return store;
}

WeightStore::~WeightStore() {
  if (descriptor >= 0)
    ::close(descriptor);
}

Status WeightStore::append(const std::string &key, DType dtype, std::vector<int64_t> shape,
                           std::span<const uint8_t> bytes) {
  FileLock lock(descriptor, LOCK_EX);
  MOE_RETURN_IF_ERROR(scanNewRecords(/*cut=*/true));
  return appendLocked(key, dtype, std::move(shape), bytes);
}

Expected<std::string> WeightStore::put(const std::string &name, DType dtype, std::vector<int64_t> shape,
                                       std::span<const uint8_t> bytes) {
  FileLock lock(descriptor, LOCK_EX);
  MOE_RETURN_IF_ERROR(scanNewRecords(/*cut=*/true));
  for (int version = 1;; ++version) {
    const std::string key = version == 1 ? name : concat(name, ".v", version);
    const StoredTensor *existing = find(key);
    if (!existing) {
      MOE_RETURN_IF_ERROR(appendLocked(key, dtype, std::move(shape), bytes));
      return key;
    }
    // The same contents: nothing to write. Other contents: next name.
    if (existing->dtype != dtype || existing->shape != shape || existing->byteSize != bytes.size())
      continue;
    std::vector<uint8_t> stored;
    MOE_RETURN_IF_ERROR(read(*existing, stored));
    if (std::equal(stored.begin(), stored.end(), bytes.begin()))
      return key;
  }
}

Status WeightStore::appendLocked(const std::string &key, DType dtype, std::vector<int64_t> shape,
                                 std::span<const uint8_t> bytes) {
  if (key.empty())
    return Status::error(filePath, ": empty tensor key");
  uint64_t expected = static_cast<uint64_t>(numElements(shape)) * dtypeBytes(dtype);
  if (bytes.size() != expected)
    return Status::error(filePath, ": tensor '", key, "': ", bytes.size(), " bytes given, shape ", formatShape(shape),
                         " of ", dtypeName(dtype), " needs ", expected);
  std::string headerText =
      nlohmann::json{{"key", key}, {"dtype", dtypeName(dtype)}, {"shape", shape}, {"bytes", bytes.size()}}.dump();
  std::vector<uint8_t> record(8);
  uint32_t head[2] = {kRecordMagic, static_cast<uint32_t>(headerText.size())};
  std::memcpy(record.data(), head, 8);
  record.insert(record.end(), headerText.begin(), headerText.end());
  uint64_t dataOffset = alignUp(validLength + record.size());
  record.resize(dataOffset - validLength, 0);
  record.insert(record.end(), bytes.begin(), bytes.end());
  uint64_t checksum = recordChecksum(headerText, bytes.data(), bytes.size());
  const uint8_t *checksumBytes = reinterpret_cast<const uint8_t *>(&checksum);
  record.insert(record.end(), checksumBytes, checksumBytes + 8);
  if (lseek(descriptor, static_cast<off_t>(validLength), SEEK_SET) < 0 ||
      !writeAll(descriptor, record.data(), record.size()) || fdatasync(descriptor) != 0) {
    const std::string reason = std::strerror(errno);
    // Leave no partial record behind (we hold the lock: nobody appended after it).
    if (ftruncate(descriptor, static_cast<off_t>(validLength)) != 0) {
    }
    return Status::error(filePath, ": cannot append tensor '", key, "': ", reason);
  }
  StoredTensor tensor{key, dtype, std::move(shape), dataOffset, bytes.size()};
  index[key] = std::move(tensor);
  validLength += record.size();
  ++recordCount;
  return Status::success();
}

const StoredTensor *WeightStore::find(const std::string &key) const {
  auto it = index.find(key);
  return it == index.end() ? nullptr : &it->second;
}

std::vector<std::string> WeightStore::keys() const {
  std::vector<std::string> out;
  for (const auto &[key, tensor] : index)
    out.push_back(key);
  return out;
}

Status WeightStore::read(const StoredTensor &tensor, std::vector<uint8_t> &bytes) const {
  resizeLarge(bytes, tensor.byteSize);
  if (!readAt(descriptor, tensor.dataOffset, bytes.data(), bytes.size()))
    return Status::error(filePath, ": cannot read tensor '", tensor.key, "'");
  return Status::success();
}

Status WeightStore::loadF32(const std::string &key, std::vector<float> &out) const {
  const StoredTensor *tensor = find(key);
  if (!tensor)
    return Status::error(filePath, ": tensor '", key, "' not in the weight store");
  std::vector<uint8_t> bytes;
  MOE_RETURN_IF_ERROR(read(*tensor, bytes));
  resizeLarge(out, static_cast<size_t>(numElements(tensor->shape)));
  return convertToF32(tensor->dtype, bytes.data(), out.size(), out.data())
      .withContext(concat(filePath, ": tensor '", key, "'"));
}

} // namespace moe
