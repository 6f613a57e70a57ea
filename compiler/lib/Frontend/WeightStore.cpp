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

#include <nlohmann/json.hpp>
#include <xxhash.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
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

} // namespace

Expected<std::unique_ptr<WeightStore>> WeightStore::open(const std::string &path, bool create) {
  std::unique_ptr<WeightStore> store(new WeightStore());
  store->filePath = path;
  store->descriptor = ::open(path.c_str(), O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0644);
  if (store->descriptor < 0)
    return Status::error(path, ": cannot open weight store: ", std::strerror(errno));
  struct stat info;
  fstat(store->descriptor, &info);
  uint64_t size = static_cast<uint64_t>(info.st_size);
  if (size == 0) {
    if (!writeAll(store->descriptor, reinterpret_cast<const uint8_t *>(kFileMagic), sizeof(kFileMagic)) ||
        fsync(store->descriptor) != 0)
      return Status::error(path, ": cannot initialise weight store: ", std::strerror(errno));
    store->validLength = sizeof(kFileMagic);
    return store;
  }
  char magic[8];
  if (size < sizeof(magic) || !readAt(store->descriptor, 0, magic, sizeof(magic)) ||
      std::memcmp(magic, kFileMagic, sizeof(magic)) != 0)
    return Status::error(path, ": not a moec weight store (bad magic)");

  uint64_t offset = sizeof(kFileMagic);
  while (offset + 8 <= size) {
    uint32_t head[2];
    if (!readAt(store->descriptor, offset, head, sizeof(head)) || head[0] != kRecordMagic)
      break;
    uint64_t headerEnd = offset + 8 + head[1];
    if (head[1] > (1u << 20) || headerEnd > size)
      break;
    std::string headerText(head[1], '\0');
    if (!readAt(store->descriptor, offset + 8, headerText.data(), headerText.size()))
      break;
    nlohmann::json header = nlohmann::json::parse(headerText, nullptr, false);
    if (header.is_discarded() || !header.is_object() || !header.contains("key") ||
        !header["key"].is_string() || !header.contains("dtype") || !header["dtype"].is_string() ||
        !header.contains("shape") || !header["shape"].is_array() || !header.contains("bytes") ||
        !header["bytes"].is_number_unsigned())
      break;
    StoredTensor tensor;
    tensor.key = header["key"].get<std::string>();
    std::optional<DType> dtype = parseDType(header["dtype"].get<std::string>());
    if (!dtype)
      break;
    tensor.dtype = *dtype;
    bool shapeValid = true;
    for (const auto &dim : header["shape"]) {
      if (!dim.is_number_unsigned()) {
        shapeValid = false;
        break;
      }
      tensor.shape.push_back(dim.get<int64_t>());
    }
    tensor.byteSize = header["bytes"].get<uint64_t>();
    tensor.dataOffset = alignUp(headerEnd);
    uint64_t recordEnd = tensor.dataOffset + tensor.byteSize + 8;
    if (!shapeValid || recordEnd > size ||
        tensor.byteSize != static_cast<uint64_t>(numElements(tensor.shape)) * dtypeBytes(tensor.dtype))
      break;
    std::vector<uint8_t> data(tensor.byteSize);
    uint64_t stored = 0;
    if (!readAt(store->descriptor, tensor.dataOffset, data.data(), data.size()) ||
        !readAt(store->descriptor, tensor.dataOffset + tensor.byteSize, &stored, 8))
      break;
    if (recordChecksum(headerText, data.data(), data.size()) != stored)
      break;
    store->index[tensor.key] = std::move(tensor);
    offset = recordEnd;
  }
  store->validLength = offset;
  store->ignoredTail = size - offset;
  return store;
}

WeightStore::~WeightStore() {
  if (descriptor >= 0)
    ::close(descriptor);
}

Status WeightStore::append(const std::string &key, DType dtype, std::vector<int64_t> shape,
                           std::span<const uint8_t> bytes) {
  if (key.empty())
    return Status::error(filePath, ": empty tensor key");
  uint64_t expected = static_cast<uint64_t>(numElements(shape)) * dtypeBytes(dtype);
  if (bytes.size() != expected)
    return Status::error(filePath, ": tensor '", key, "': ", bytes.size(), " bytes given, shape ",
                         formatShape(shape), " of ", dtypeName(dtype), " needs ", expected);
  // Cut a torn tail left by an interrupted writer before appending.
  if (ftruncate(descriptor, static_cast<off_t>(validLength)) != 0)
    return Status::error(filePath, ": cannot truncate torn tail: ", std::strerror(errno));
  ignoredTail = 0;
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
      !writeAll(descriptor, record.data(), record.size()) || fdatasync(descriptor) != 0)
    return Status::error(filePath, ": cannot append tensor '", key, "': ", std::strerror(errno));
  StoredTensor tensor{key, dtype, std::move(shape), dataOffset, bytes.size()};
  index[key] = std::move(tensor);
  validLength += record.size();
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
  bytes.resize(tensor.byteSize);
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
  out.resize(static_cast<size_t>(numElements(tensor->shape)));
  return convertToF32(tensor->dtype, bytes.data(), out.size(), out.data())
      .withContext(concat(filePath, ": tensor '", key, "'"));
}

} // namespace moe
