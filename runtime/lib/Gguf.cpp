//===- Gguf.cpp - GGUF files (llama.cpp's model container) ----------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Runtime/Gguf.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Support/AtomicFile.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace moe {

using quant::GgmlType;

namespace {

constexpr uint32_t kMagic = 0x46554747; // "GGUF" little-endian
constexpr uint32_t kVersion = 3;
constexpr uint64_t kDefaultAlignment = 32;
/// Limits that keep a hostile header from asking for absurd allocations.
constexpr uint64_t kMaxCount = uint64_t(1) << 24;
constexpr int kMaxDims = 4;

uint64_t alignUp(uint64_t value, uint64_t alignment) { return (value + alignment - 1) / alignment * alignment; }

bool isInteger(GgufType type) {
  switch (type) {
  case GgufType::U8:
  case GgufType::I8:
  case GgufType::U16:
  case GgufType::I16:
  case GgufType::U32:
  case GgufType::I32:
  case GgufType::U64:
  case GgufType::I64:
  case GgufType::Bool:
    return true;
  default:
    return false;
  }
}
bool isFloat(GgufType type) { return type == GgufType::F32 || type == GgufType::F64; }
/// Bytes of a scalar of `type` (0 for String and Array).
size_t scalarBytes(GgufType type) {
  switch (type) {
  case GgufType::U8:
  case GgufType::I8:
  case GgufType::Bool:
    return 1;
  case GgufType::U16:
  case GgufType::I16:
    return 2;
  case GgufType::U32:
  case GgufType::I32:
  case GgufType::F32:
    return 4;
  case GgufType::U64:
  case GgufType::I64:
  case GgufType::F64:
    return 8;
  default:
    return 0;
  }
}

// --- Writing -----------------------------------------------------------------

class Bytes {
public:
  template <typename T> void put(T value) {
    const size_t at = out.size();
    out.resize(at + sizeof(T));
    std::memcpy(out.data() + at, &value, sizeof(T));
  }
  void string(const std::string &text) {
    put<uint64_t>(text.size());
    out.insert(out.end(), text.begin(), text.end());
  }
  void scalar(GgufType type, int64_t integer, double real) {
    switch (type) {
    case GgufType::U8:
    case GgufType::I8:
    case GgufType::Bool:
      return put<uint8_t>(static_cast<uint8_t>(integer));
    case GgufType::U16:
    case GgufType::I16:
      return put<uint16_t>(static_cast<uint16_t>(integer));
    case GgufType::U32:
    case GgufType::I32:
      return put<uint32_t>(static_cast<uint32_t>(integer));
    case GgufType::U64:
    case GgufType::I64:
      return put<uint64_t>(static_cast<uint64_t>(integer));
    case GgufType::F32:
      return put<float>(static_cast<float>(real));
    case GgufType::F64:
      return put<double>(real);
    default:
      return;
    }
  }
  void value(const GgufValue &v) {
    if (v.type == GgufType::String)
      return string(v.text);
    if (v.type != GgufType::Array)
      return scalar(v.type, v.integer, v.real);
    put<uint32_t>(static_cast<uint32_t>(v.elementType));
    put<uint64_t>(v.size());
    if (v.elementType == GgufType::String)
      for (const std::string &s : v.strings)
        string(s);
    else if (isFloat(v.elementType))
      for (double r : v.reals)
        scalar(v.elementType, 0, r);
    else
      for (int64_t i : v.integers)
        scalar(v.elementType, i, 0);
  }
  std::vector<uint8_t> out;
};

// --- Reading -----------------------------------------------------------------

/// A bounds-checked cursor over the header; the first error sticks.
class Cursor {
public:
  Cursor(const uint8_t *data, uint64_t size, const std::string &path) : data(data), size(size), path(path) {}

  template <typename T> bool get(T &value, const char *what) {
    if (!need(sizeof(T), what))
      return false;
    std::memcpy(&value, data + at, sizeof(T));
    at += sizeof(T);
    return true;
  }
  bool string(std::string &text, const char *what) {
    uint64_t length;
    if (!get(length, what))
      return false;
    if (!need(length, what))
      return false;
    text.assign(reinterpret_cast<const char *>(data + at), length);
    at += length;
    return true;
  }
  bool scalar(GgufType type, GgufValue &v, const std::string &key) {
    const std::string what = "the value of '" + key + "'";
    switch (type) {
    case GgufType::U8:
    case GgufType::Bool: {
      uint8_t x;
      if (!get(x, what.c_str()))
        return false;
      if (type == GgufType::Bool && x > 1)
        return fail(concat("'", key, "': a bool must be 0 or 1, got ", int(x)));
      v.integer = x;
      return true;
    }
    case GgufType::I8: {
      int8_t x;
      return get(x, what.c_str()) && (v.integer = x, true);
    }
    case GgufType::U16: {
      uint16_t x;
      return get(x, what.c_str()) && (v.integer = x, true);
    }
    case GgufType::I16: {
      int16_t x;
      return get(x, what.c_str()) && (v.integer = x, true);
    }
    case GgufType::U32: {
      uint32_t x;
      return get(x, what.c_str()) && (v.integer = x, true);
    }
    case GgufType::I32: {
      int32_t x;
      return get(x, what.c_str()) && (v.integer = x, true);
    }
    case GgufType::U64: {
      uint64_t x;
      if (!get(x, what.c_str()))
        return false;
      if (x > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
        return fail(concat("'", key, "': ", x, " is beyond what moec reads (2^63 - 1)"));
      v.integer = static_cast<int64_t>(x);
      return true;
    }
    case GgufType::I64: {
      int64_t x;
      return get(x, what.c_str()) && (v.integer = x, true);
    }
    case GgufType::F32: {
      float x;
      return get(x, what.c_str()) && (v.real = x, true);
    }
    case GgufType::F64: {
      double x;
      return get(x, what.c_str()) && (v.real = x, true);
    }
    default:
      return fail(concat("'", key, "': unknown value type ", static_cast<uint32_t>(type),
                         " (expected 0..12 of the GGUF specification)"));
    }
  }
  bool value(GgufValue &v, const std::string &key) {
    uint32_t type;
    if (!get(type, "a value type"))
      return false;
    v.type = static_cast<GgufType>(type);
    if (v.type == GgufType::String)
      return string(v.text, ("the string of '" + key + "'").c_str());
    if (v.type != GgufType::Array)
      return scalar(v.type, v, key);
    uint32_t element;
    uint64_t count;
    if (!get(element, "an array's element type") || !get(count, "an array's length"))
      return false;
    v.elementType = static_cast<GgufType>(element);
    if (v.elementType == GgufType::Array)
      return fail("'" + key + "': arrays of arrays are not read by moec");
    const size_t each = scalarBytes(v.elementType);
    if (v.elementType != GgufType::String && each == 0)
      return fail(concat("'", key, "': unknown array element type ", element));
    // Every element takes at least one byte (strings eight): a count the
    // rest of the file cannot hold is refused before anything is allocated.
    if (count > (size - at) / (each ? each : 8))
      return fail(concat("'", key, "': an array of ", count, " elements does not fit in the file"));
    for (uint64_t i = 0; i < count; ++i) {
      if (v.elementType == GgufType::String) {
        v.strings.emplace_back();
        if (!string(v.strings.back(), ("an element of '" + key + "'").c_str()))
          return false;
      } else {
        GgufValue element;
        if (!scalar(v.elementType, element, key))
          return false;
        if (isFloat(v.elementType))
          v.reals.push_back(element.real);
        else
          v.integers.push_back(element.integer);
      }
    }
    return true;
  }
  bool fail(const std::string &message) {
    if (status.ok())
      status = Status::error(path, ": ", message);
    return false;
  }
  uint64_t position() const { return at; }
  Status status;

private:
  bool need(uint64_t bytes, const char *what) {
    if (bytes > size - at)
      return fail(concat(what, " at byte ", at, " runs past the end of the file (", size,
                         " bytes): truncated or not a GGUF file"));
    return true;
  }
  const uint8_t *data;
  uint64_t size, at = 0;
  const std::string &path;
};

} // namespace

GgufValue GgufValue::u32(uint32_t value) {
  GgufValue v;
  v.type = GgufType::U32;
  v.integer = value;
  return v;
}
GgufValue GgufValue::i32(int32_t value) {
  GgufValue v;
  v.type = GgufType::I32;
  v.integer = value;
  return v;
}
GgufValue GgufValue::u64(uint64_t value) {
  GgufValue v;
  v.type = GgufType::U64;
  v.integer = static_cast<int64_t>(value);
  return v;
}
GgufValue GgufValue::f32(float value) {
  GgufValue v;
  v.type = GgufType::F32;
  v.real = value;
  return v;
}
GgufValue GgufValue::boolean(bool value) {
  GgufValue v;
  v.type = GgufType::Bool;
  v.integer = value ? 1 : 0;
  return v;
}
GgufValue GgufValue::string(std::string value) {
  GgufValue v;
  v.type = GgufType::String;
  v.text = std::move(value);
  return v;
}
GgufValue GgufValue::stringArray(std::vector<std::string> values) {
  GgufValue v;
  v.type = GgufType::Array;
  v.elementType = GgufType::String;
  v.strings = std::move(values);
  return v;
}
GgufValue GgufValue::i32Array(std::vector<int64_t> values) {
  GgufValue v;
  v.type = GgufType::Array;
  v.elementType = GgufType::I32;
  v.integers = std::move(values);
  return v;
}
GgufValue GgufValue::f32Array(std::vector<double> values) {
  GgufValue v;
  v.type = GgufType::Array;
  v.elementType = GgufType::F32;
  v.reals = std::move(values);
  return v;
}
size_t GgufValue::size() const {
  if (type != GgufType::Array)
    return 0;
  return elementType == GgufType::String ? strings.size() : isFloat(elementType) ? reals.size() : integers.size();
}

int64_t GgufTensorInfo::elements() const { return numElements(ne); }

Expected<uint64_t> ggufTensorBytes(GgmlType type, const std::vector<int64_t> &ne) {
  const quant::GgmlTraits *traits = quant::ggmlTraits(type);
  if (!traits)
    return Status::error("ggml type ", static_cast<uint32_t>(type), " is not one moec reads (F32, F16, BF16, ",
                         "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K)");
  if (ne.empty() || ne.size() > static_cast<size_t>(kMaxDims))
    return Status::error(ne.size(), " dimensions (expected 1 to ", kMaxDims, ")");
  uint64_t rows = 1;
  for (size_t d = 0; d < ne.size(); ++d) {
    if (ne[d] <= 0 || ne[d] > (int64_t(1) << 40))
      return Status::error("dimension ", d, " is ", ne[d], " (expected 1 to 2^40)");
    if (d > 0) {
      if (rows > (uint64_t(1) << 50) / static_cast<uint64_t>(ne[d]))
        return Status::error("more than 2^50 rows");
      rows *= static_cast<uint64_t>(ne[d]);
    }
  }
  if (ne[0] % traits->blockSize != 0)
    return Status::error("rows of ", ne[0], " values are not whole ", traits->ggmlName, " blocks of ",
                         traits->blockSize);
  return rows * static_cast<uint64_t>(ne[0] / traits->blockSize) * static_cast<uint64_t>(traits->blockBytes);
}

void GgufWriter::set(const std::string &key, GgufValue value) {
  for (auto &[existing, v] : keys)
    if (existing == key) {
      v = std::move(value);
      return;
    }
  keys.emplace_back(key, std::move(value));
}

Status GgufWriter::addTensor(std::string name, std::vector<int64_t> ne, GgmlType type) {
  for (const GgufTensorInfo &info : infos)
    if (info.name == name)
      return Status::error("GGUF tensor '", name, "' is added twice");
  Expected<uint64_t> bytes = ggufTensorBytes(type, ne);
  if (!bytes)
    return Status::error("GGUF tensor '", name, "': ", bytes.status().message());
  GgufTensorInfo info;
  info.name = std::move(name);
  info.ne = std::move(ne);
  info.type = type;
  info.bytes = *bytes;
  info.offset = infos.empty() ? 0 : alignUp(infos.back().offset + infos.back().bytes, kDefaultAlignment);
  infos.push_back(std::move(info));
  return Status::success();
}

Status GgufWriter::write(const std::string &path, const Producer &produce) const {
  Bytes header;
  header.put<uint32_t>(kMagic);
  header.put<uint32_t>(kVersion);
  header.put<uint64_t>(infos.size());
  header.put<uint64_t>(keys.size());
  for (const auto &[key, value] : keys) {
    header.string(key);
    header.put<uint32_t>(static_cast<uint32_t>(value.type));
    header.value(value);
  }
  for (const GgufTensorInfo &info : infos) {
    header.string(info.name);
    header.put<uint32_t>(static_cast<uint32_t>(info.ne.size()));
    for (int64_t n : info.ne)
      header.put<uint64_t>(static_cast<uint64_t>(n));
    header.put<uint32_t>(static_cast<uint32_t>(info.type));
    header.put<uint64_t>(info.offset);
  }
  header.out.resize(alignUp(header.out.size(), kDefaultAlignment), 0);

  Expected<std::unique_ptr<AtomicFile>> file = AtomicFile::create(path);
  if (!file)
    return file.status();
  MOE_RETURN_IF_ERROR((*file)->write(header.out));
  uint64_t written = 0;
  std::vector<uint8_t> bytes;
  const std::vector<uint8_t> padding(kDefaultAlignment, 0);
  for (size_t i = 0; i < infos.size(); ++i) {
    if (written < infos[i].offset)
      MOE_RETURN_IF_ERROR(
          (*file)->write(std::span<const uint8_t>(padding.data(), static_cast<size_t>(infos[i].offset - written))));
    written = infos[i].offset;
    bytes.clear();
    MOE_RETURN_IF_ERROR(produce(i, bytes));
    if (bytes.size() != infos[i].bytes)
      return Status::error(path, ": tensor '", infos[i].name, "' has ", bytes.size(),
                           " bytes, its type and shape need ", infos[i].bytes);
    MOE_RETURN_IF_ERROR((*file)->write(bytes));
    written += bytes.size();
  }
  return (*file)->commit();
}

Expected<std::unique_ptr<GgufFile>> GgufFile::open(const std::string &path) {
  Expected<std::unique_ptr<MappedFile>> mapped = MappedFile::open(path);
  if (!mapped)
    return mapped.status();
  auto file = std::unique_ptr<GgufFile>(new GgufFile());
  file->filePath = path;
  file->mapping = mapped.take();
  const uint8_t *data = file->mapping->data();
  const uint64_t size = file->mapping->size();
  Cursor in(data, size, path);
  uint32_t magic = 0;
  uint64_t tensorCount = 0, keyCount = 0;
  if (!in.get(magic, "the magic"))
    return in.status;
  if (magic != kMagic)
    return Status::error(path, ": not a GGUF file (the first four bytes are not \"GGUF\")");
  if (!in.get(file->fileVersion, "the version") || !in.get(tensorCount, "the tensor count") ||
      !in.get(keyCount, "the key-value count"))
    return in.status;
  if (file->fileVersion != 2 && file->fileVersion != 3)
    return Status::error(path, ": GGUF version ", file->fileVersion, " (moec reads versions 2 and 3)");
  if (tensorCount > kMaxCount || keyCount > kMaxCount)
    return Status::error(path, ": ", tensorCount, " tensors and ", keyCount, " keys (at most 2^24 each)");
  for (uint64_t k = 0; k < keyCount; ++k) {
    std::string key;
    GgufValue value;
    if (!in.string(key, "a key") || !in.value(value, key))
      return in.status;
    if (file->keyIndex.count(key))
      return Status::error(path, ": key '", key, "' appears twice");
    file->keyIndex[key] = file->keyValues.size();
    file->keyValues.emplace_back(std::move(key), std::move(value));
  }
  uint64_t alignment = kDefaultAlignment;
  if (const GgufValue *a = file->find("general.alignment")) {
    if (!isInteger(a->type) || a->type == GgufType::Bool || a->integer <= 0 || a->integer > 65536 ||
        (a->integer & (a->integer - 1)) != 0)
      return Status::error(path, ": general.alignment must be a power of two up to 65536");
    alignment = static_cast<uint64_t>(a->integer);
  }
  for (uint64_t t = 0; t < tensorCount; ++t) {
    GgufTensorInfo info;
    uint32_t dims = 0, type = 0;
    if (!in.string(info.name, "a tensor name") || !in.get(dims, "a tensor's dimension count"))
      return in.status;
    if (dims == 0 || dims > kMaxDims)
      return Status::error(path, ": tensor '", info.name, "' has ", dims, " dimensions (expected 1 to ", kMaxDims, ")");
    for (uint32_t d = 0; d < dims; ++d) {
      uint64_t n;
      if (!in.get(n, "a tensor dimension"))
        return in.status;
      info.ne.push_back(n > (uint64_t(1) << 40) ? -1 : static_cast<int64_t>(n));
    }
    if (!in.get(type, "a tensor type") || !in.get(info.offset, "a tensor offset"))
      return in.status;
    info.type = static_cast<GgmlType>(type);
    Expected<uint64_t> bytes = ggufTensorBytes(info.type, info.ne);
    if (!bytes)
      return Status::error(path, ": tensor '", info.name, "': ", bytes.status().message());
    info.bytes = *bytes;
    if (info.offset % alignment != 0)
      return Status::error(path, ": tensor '", info.name, "' starts at data offset ", info.offset,
                           ", not a multiple of the alignment ", alignment);
    if (file->tensorIndex.count(info.name))
      return Status::error(path, ": tensor '", info.name, "' appears twice");
    file->tensorIndex[info.name] = file->infos.size();
    file->infos.push_back(std::move(info));
  }
  const uint64_t dataOffset = alignUp(in.position(), alignment);
  if (dataOffset > size)
    return Status::error(path, ": the data section would start at byte ", dataOffset, ", past the end (", size, ")");
  file->dataStart = data + dataOffset;
  // Tensors lie inside the file and do not overlap.
  std::vector<std::pair<uint64_t, size_t>> order;
  for (size_t i = 0; i < file->infos.size(); ++i)
    order.emplace_back(file->infos[i].offset, i);
  std::sort(order.begin(), order.end());
  uint64_t end = 0;
  for (auto [offset, i] : order) {
    const GgufTensorInfo &info = file->infos[i];
    if (offset < end)
      return Status::error(path, ": tensor '", info.name, "' overlaps the tensor before it");
    if (info.bytes > size - dataOffset || offset > size - dataOffset - info.bytes)
      return Status::error(path, ": tensor '", info.name, "' (", info.bytes, " bytes at data offset ", offset,
                           ") runs past the end of the file (", size, " bytes): truncated?");
    end = offset + info.bytes;
  }
  return file;
}

uint64_t GgufFile::fileOffset(const GgufTensorInfo &tensor) const {
  return static_cast<uint64_t>(dataStart - mapping->data()) + tensor.offset;
}

// llama.cpp's name of a non-expert role (after "blk.N." for layer roles).
const char *ggufRoleName(TensorRole role) {
  switch (role) {
  case TensorRole::Embedding:
    return "token_embd.weight";
  case TensorRole::LmHead:
    return "output.weight";
  case TensorRole::LmHeadBias:
    return "output.bias";
  case TensorRole::FinalNorm:
    return "output_norm.weight";
  case TensorRole::FinalNormBias:
    return "output_norm.bias";
  case TensorRole::AttentionNorm:
    return "attn_norm.weight";
  case TensorRole::AttentionNormBias:
    return "attn_norm.bias";
  case TensorRole::MlpNorm:
    return "ffn_norm.weight";
  case TensorRole::MlpNormBias:
    return "ffn_norm.bias";
  case TensorRole::QueryProj:
    return "attn_q.weight";
  case TensorRole::QueryBias:
    return "attn_q.bias";
  case TensorRole::KeyProj:
    return "attn_k.weight";
  case TensorRole::KeyBias:
    return "attn_k.bias";
  case TensorRole::ValueProj:
    return "attn_v.weight";
  case TensorRole::ValueBias:
    return "attn_v.bias";
  case TensorRole::OutputProj:
    return "attn_output.weight";
  case TensorRole::OutputBias:
    return "attn_output.bias";
  case TensorRole::QueryNorm:
    return "attn_q_norm.weight";
  case TensorRole::KeyNorm:
    return "attn_k_norm.weight";
  case TensorRole::QueryDownProj:
    return "attn_q_a.weight";
  case TensorRole::QueryDownNorm:
    return "attn_q_a_norm.weight";
  case TensorRole::QueryUpProj:
    return "attn_q_b.weight";
  case TensorRole::KvDownProj:
    return "attn_kv_a_mqa.weight";
  case TensorRole::KvDownNorm:
    return "attn_kv_a_norm.weight";
  case TensorRole::KvUpProj:
    return "attn_kv_b.weight";
  case TensorRole::DenseGate:
    return "ffn_gate.weight";
  case TensorRole::DenseUp:
    return "ffn_up.weight";
  case TensorRole::DenseDown:
    return "ffn_down.weight";
  case TensorRole::Router:
    return "ffn_gate_inp.weight";
  case TensorRole::RouterCorrectionBias:
    return "exp_probs_b.bias";
  case TensorRole::SharedGate:
    return "ffn_gate_shexp.weight";
  case TensorRole::SharedUp:
    return "ffn_up_shexp.weight";
  case TensorRole::SharedDown:
    return "ffn_down_shexp.weight";
  case TensorRole::SharedExpertGate:
    return "ffn_gate_inp_shexp.weight";
  default:
    return nullptr;
  }
}

const GgufValue *GgufFile::find(const std::string &key) const {
  auto it = keyIndex.find(key);
  return it == keyIndex.end() ? nullptr : &keyValues[it->second].second;
}

const GgufTensorInfo *GgufFile::tensor(const std::string &name) const {
  auto it = tensorIndex.find(name);
  return it == tensorIndex.end() ? nullptr : &infos[it->second];
}

} // namespace moe
