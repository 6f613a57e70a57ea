//===- Safetensors.cpp - Validated, memory-mapped safetensors files -------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/Safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <set>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moe {

using json = nlohmann::json;

int64_t numElements(std::span<const int64_t> shape) {
  int64_t count = 1;
  for (int64_t dim : shape)
    count *= dim;
  return count;
}

std::string formatShape(std::span<const int64_t> shape) {
  std::string text = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i)
      text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + "]";
}

const TensorInfo *SafetensorsHeader::find(std::string_view name) const {
  auto it = std::lower_bound(tensors.begin(), tensors.end(), name,
                             [](const TensorInfo &info, std::string_view key) { return info.name < key; });
  if (it == tensors.end() || it->name != name)
    return nullptr;
  return &*it;
}

namespace {

/// Parses one tensor entry; `where` prefixes every message.
Status parseTensorEntry(const std::string &name, const json &entry, const std::string &where, TensorInfo &info) {
  info.name = name;
  if (!entry.is_object())
    return Status::error(where, ": entry is not a JSON object");
  auto dtypeIt = entry.find("dtype");
  auto shapeIt = entry.find("shape");
  auto offsetsIt = entry.find("data_offsets");
  if (dtypeIt == entry.end() || !dtypeIt->is_string())
    return Status::error(where, ": missing string field 'dtype'");
  if (shapeIt == entry.end() || !shapeIt->is_array())
    return Status::error(where, ": missing array field 'shape'");
  if (offsetsIt == entry.end() || !offsetsIt->is_array() || offsetsIt->size() != 2)
    return Status::error(where, ": field 'data_offsets' must be an array [begin, end]");

  const std::string &dtypeName = dtypeIt->get_ref<const std::string &>();
  std::optional<DType> dtype = parseDType(dtypeName);
  if (!dtype)
    return Status::error(where, ": unknown or unsupported dtype '", dtypeName, "'; supported: ", supportedDTypeList());
  info.dtype = *dtype;

  // Element count with overflow detection: every dimension is bounded so the
  // running product fits 128 bits.
  unsigned __int128 elements = 1;
  for (const json &dim : *shapeIt) {
    if (!dim.is_number_unsigned() || dim.get<uint64_t>() > (1ull << 48))
      return Status::error(where, ": shape ", shapeIt->dump(), " must hold non-negative integers below 2^48");
    info.shape.push_back(static_cast<int64_t>(dim.get<uint64_t>()));
    elements *= dim.get<uint64_t>();
    if (elements > (static_cast<unsigned __int128>(1) << 62))
      return Status::error(where, ": shape ", shapeIt->dump(), " has too many elements");
  }
  for (const json &offset : *offsetsIt)
    if (!offset.is_number_unsigned())
      return Status::error(where, ": data_offsets ", offsetsIt->dump(), " must be non-negative integers");
  info.dataBegin = (*offsetsIt)[0].get<uint64_t>();
  info.dataEnd = (*offsetsIt)[1].get<uint64_t>();
  if (info.dataEnd < info.dataBegin)
    return Status::error(where, ": data_offsets ", offsetsIt->dump(), " end before they begin");
  unsigned __int128 expectedBytes = elements * dtypeBytes(info.dtype);
  if (expectedBytes != info.dataEnd - info.dataBegin)
    return Status::error(where, ": data_offsets ", offsetsIt->dump(), " span ", info.dataEnd - info.dataBegin,
                         " bytes, but shape ", formatShape(info.shape), " of ", dtypeName, " needs ",
                         static_cast<uint64_t>(expectedBytes), " bytes");
  return Status::success();
}

} // namespace

Expected<SafetensorsHeader> parseSafetensorsHeader(const uint8_t *file, uint64_t fileSize, std::string_view fileName) {
  std::string name(fileName);
  if (fileSize < 8)
    return Status::error(name, ": file is ", fileSize,
                         " bytes, too short for the 8-byte header length "
                         "(truncated or not a safetensors file)");
  uint64_t headerLength = 0;
  for (int i = 7; i >= 0; --i)
    headerLength = (headerLength << 8) | file[i];
  if (headerLength > kMaxSafetensorsHeaderBytes)
    return Status::error(name, ": header length ", headerLength, " exceeds the limit of ", kMaxSafetensorsHeaderBytes,
                         " bytes (corrupt or not a safetensors file)");
  if (headerLength > fileSize - 8)
    return Status::error(name, ": header length ", headerLength, " extends beyond the end of the file (", fileSize,
                         " bytes; truncated?)");
  if (headerLength < 2 || file[8] != '{')
    return Status::error(name, ": header does not start with '{' "
                               "(expected a JSON object)");

  // Parse with a callback that tracks the keys of each open object: the
  // JSON library keeps the last of duplicate keys silently, safetensors
  // forbids them.
  std::vector<std::set<std::string>> openObjects;
  std::string duplicateKey;
  auto trackKeys = [&](int, json::parse_event_t event, json &parsed) {
    if (event == json::parse_event_t::object_start)
      openObjects.emplace_back();
    else if (event == json::parse_event_t::object_end && !openObjects.empty())
      openObjects.pop_back();
    else if (event == json::parse_event_t::key && !openObjects.empty() && parsed.is_string() &&
             !openObjects.back().insert(parsed.get<std::string>()).second && duplicateKey.empty())
      duplicateKey = parsed.get<std::string>();
    return true;
  };
  const char *text = reinterpret_cast<const char *>(file + 8);
  json root = json::parse(text, text + headerLength, trackKeys,
                          /*allow_exceptions=*/false);
  if (root.is_discarded())
    return Status::error(name, ": header (", headerLength, " bytes) is not valid UTF-8 JSON");
  if (!root.is_object())
    return Status::error(name, ": header is not a JSON object");
  if (!duplicateKey.empty())
    return Status::error(name, ": duplicate key '", duplicateKey, "' in header");

  SafetensorsHeader header;
  header.dataOffset = 8 + headerLength;
  uint64_t bufferSize = fileSize - header.dataOffset;
  for (auto &[key, value] : root.items()) {
    if (key == "__metadata__") {
      if (!value.is_object())
        return Status::error(name, ": __metadata__ must be an object of "
                                   "string values");
      for (auto &[metaKey, metaValue] : value.items()) {
        if (!metaValue.is_string())
          return Status::error(name, ": __metadata__ key '", metaKey, "' must have a string value");
        header.metadata[metaKey] = metaValue.get<std::string>();
      }
      continue;
    }
    TensorInfo info;
    MOE_RETURN_IF_ERROR(parseTensorEntry(key, value, concat(name, ": tensor '", key, "'"), info));
    if (info.dataEnd > bufferSize)
      return Status::error(name, ": tensor '", key, "': data_offsets [", info.dataBegin, ", ", info.dataEnd,
                           "] lie beyond the data buffer of ", bufferSize, " bytes (truncated file?)");
    header.tensors.push_back(std::move(info));
  }

  // The entries sorted by offset must tile the buffer exactly.
  std::vector<const TensorInfo *> byOffset;
  for (const TensorInfo &info : header.tensors)
    byOffset.push_back(&info);
  std::sort(byOffset.begin(), byOffset.end(), [](const TensorInfo *a, const TensorInfo *b) {
    return std::tie(a->dataBegin, a->dataEnd, a->name) < std::tie(b->dataBegin, b->dataEnd, b->name);
  });
  uint64_t cursor = 0;
  const TensorInfo *previous = nullptr;
  for (const TensorInfo *info : byOffset) {
    if (info->dataBegin < cursor)
      return Status::error(name, ": tensor '", info->name, "' data_offsets [", info->dataBegin, ", ", info->dataEnd,
                           "] overlap tensor '", previous->name, "' ending at ", cursor);
    if (info->dataBegin > cursor)
      return Status::error(name, ": hole in the data buffer: bytes [", cursor, ", ", info->dataBegin,
                           ") belong to no tensor (before tensor '", info->name, "')");
    cursor = info->dataEnd;
    if (info->byteSize() > 0)
      previous = info;
  }
  if (cursor != bufferSize)
    return Status::error(name, ": data buffer is ", bufferSize, " bytes but tensors cover only ", cursor,
                         " (trailing bytes after the last tensor)");
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorInfo &a, const TensorInfo &b) { return a.name < b.name; });
  return header;
}

Expected<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string &path) {
  Expected<std::unique_ptr<MappedFile>> mapped = MappedFile::open(path);
  if (!mapped)
    return mapped.status();
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->filePath = path;
  file->mapping = mapped.take();
  static const uint8_t empty[1] = {0};
  Expected<SafetensorsHeader> header =
      parseSafetensorsHeader(file->mapping->data() ? file->mapping->data() : empty, file->mapping->size(), path);
  if (!header)
    return header.status();
  file->header = header.take();
  return file;
}

SafetensorsFile::~SafetensorsFile() = default;

std::span<const uint8_t> SafetensorsFile::data(const TensorInfo &tensor) const {
  return {mapping->data() + header.dataOffset + tensor.dataBegin, tensor.byteSize()};
}

void SafetensorsFile::releasePages(const TensorInfo &tensor) const {
  mapping->releasePages(data(tensor).data(), tensor.byteSize());
}

Status SafetensorsWriter::addTensorView(std::string name, DType dtype, std::vector<int64_t> shape,
                                        std::span<const uint8_t> bytes) {
  if (name.empty() || name == "__metadata__")
    return Status::error("invalid tensor name '", name, "'");
  for (int64_t dim : shape)
    if (dim < 0)
      return Status::error("tensor '", name, "': negative dimension in shape ", formatShape(shape));
  uint64_t expected = static_cast<uint64_t>(numElements(shape)) * dtypeBytes(dtype);
  if (bytes.size() != expected)
    return Status::error("tensor '", name, "': ", bytes.size(), " bytes given, shape ", formatShape(shape), " of ",
                         dtypeName(dtype), " needs ", expected);
  if (entries.count(name))
    return Status::error("tensor '", name, "' added twice");
  entries.emplace(std::move(name), Entry{dtype, std::move(shape), {}, bytes});
  return Status::success();
}

Status SafetensorsWriter::addTensor(std::string name, DType dtype, std::vector<int64_t> shape,
                                    std::vector<uint8_t> bytes) {
  const std::string key = name;
  MOE_RETURN_IF_ERROR(addTensorView(std::move(name), dtype, std::move(shape), bytes));
  // The entry owns the bytes; a moved vector keeps its buffer.
  Entry &entry = entries.at(key);
  entry.owned = std::move(bytes);
  entry.bytes = entry.owned;
  return Status::success();
}

Status SafetensorsWriter::addF32Tensor(std::string name, DType dtype, std::vector<int64_t> shape,
                                       std::span<const float> values) {
  std::vector<uint8_t> bytes(values.size() * dtypeBytes(dtype));
  switch (dtype) {
  case DType::F32:
    std::memcpy(bytes.data(), values.data(), bytes.size());
    break;
  case DType::F16:
  case DType::BF16:
    for (size_t i = 0; i < values.size(); ++i) {
      uint16_t bits = dtype == DType::F16 ? floatToHalf(values[i]) : floatToBfloat16(values[i]);
      std::memcpy(bytes.data() + 2 * i, &bits, 2);
    }
    break;
  default:
    return Status::error("tensor '", name, "': cannot write f32 values as ", dtypeName(dtype));
  }
  return addTensor(std::move(name), dtype, std::move(shape), std::move(bytes));
}

void SafetensorsWriter::setMetadata(std::string key, std::string value) { metadata[std::move(key)] = std::move(value); }

std::vector<std::span<const uint8_t>> SafetensorsWriter::layout(std::string &head) const {
  std::vector<const std::pair<const std::string, Entry> *> order;
  for (const auto &entry : entries)
    order.push_back(&entry);
  std::sort(order.begin(), order.end(), [](auto *a, auto *b) {
    unsigned aBytes = dtypeBytes(a->second.dtype), bBytes = dtypeBytes(b->second.dtype);
    return aBytes != bBytes ? aBytes > bBytes : a->first < b->first;
  });

  json header = json::object();
  if (!metadata.empty())
    header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (auto *entry : order) {
    uint64_t size = entry->second.bytes.size();
    header[entry->first] = {{"dtype", dtypeName(entry->second.dtype)},
                            {"shape", entry->second.shape},
                            {"data_offsets", {offset, offset + size}}};
    offset += size;
  }
  std::string text = header.dump();
  // Pad with spaces so the data buffer starts on a 64-byte boundary.
  while ((8 + text.size()) % 64 != 0)
    text.push_back(' ');
  head.assign(8, '\0');
  uint64_t length = text.size();
  for (int i = 0; i < 8; ++i)
    head[static_cast<size_t>(i)] = static_cast<char>(length >> (8 * i));
  head += text;
  std::vector<std::span<const uint8_t>> chunks;
  chunks.emplace_back(reinterpret_cast<const uint8_t *>(head.data()), head.size());
  for (auto *entry : order)
    chunks.push_back(entry->second.bytes);
  return chunks;
}

std::vector<uint8_t> SafetensorsWriter::serialize() const {
  std::string head;
  std::vector<uint8_t> out;
  for (std::span<const uint8_t> chunk : layout(head))
    out.insert(out.end(), chunk.begin(), chunk.end());
  return out;
}

Status SafetensorsWriter::write(const std::string &path) const {
  // Streamed chunk by chunk: no second copy of the tensors in memory.
  std::string head;
  return writeChunksAtomically(path, layout(head));
}

Status readTensorSlice(const SafetensorsFile &file, const TensorInfo &tensor, std::span<const int64_t> slice,
                       std::vector<uint8_t> &bytes) {
  if (tensor.shape.size() != 3)
    return Status::error(file.path(), ": tensor '", tensor.name, "' has shape ", formatShape(tensor.shape),
                         "; a slice needs a 3-D tensor");
  if (slice.size() != 4)
    return Status::error(file.path(), ": tensor '", tensor.name, "': a slice is [index, first row, rows, transposed]");
  const int64_t index = slice[0], first = slice[1], rows = slice[2];
  const bool transposed = slice[3] == 1;
  const int64_t A = tensor.shape[1], B = tensor.shape[2];
  const int64_t rowLength = transposed ? A : B, available = transposed ? B : A;
  if (index < 0 || first < 0 || rows < 0 || index >= tensor.shape[0] || first + rows > available)
    return Status::error(file.path(), ": tensor '", tensor.name, "' ", formatShape(tensor.shape), " has no slice [",
                         index, ", ", first, ", ", rows, "]");
  const size_t element = dtypeBytes(tensor.dtype);
  const uint8_t *matrix = file.data(tensor).data() + static_cast<size_t>(index * A * B) * element;
  bytes.resize(static_cast<size_t>(rows * rowLength) * element);
  for (int64_t r = 0; r < rows; ++r) {
    if (!transposed) {
      std::memcpy(bytes.data() + static_cast<size_t>(r * rowLength) * element,
                  matrix + static_cast<size_t>((first + r) * B) * element, static_cast<size_t>(B) * element);
      continue;
    }
    for (int64_t c = 0; c < rowLength; ++c)
      std::memcpy(bytes.data() + static_cast<size_t>(r * rowLength + c) * element,
                  matrix + static_cast<size_t>(c * B + (first + r)) * element, element);
  }
  return Status::success();
}

} // namespace moe
