//===- GroupedVariant.cpp - qwen3_moe with other head counts --------------===//
//
// Part of moec. See GroupedVariant.h.
//
//===----------------------------------------------------------------------===//

#include "GroupedVariant.h"

#include "moe/Frontend/Safetensors.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <sstream>
#include <utility>
#include <vector>

namespace moe::testing {

Status writeGroupedVariant(const std::string &source, const std::filesystem::path &dir, int heads, int kvHeads,
                           int headDim) {
  if (heads <= 0 || kvHeads <= 0 || headDim <= 0 || heads % kvHeads != 0)
    return Status::error("a variant needs positive head counts, the query heads a multiple of the KV heads, and a "
                         "positive head size; got ",
                         heads, " over ", kvHeads, " of ", headDim);
  std::error_code made;
  std::filesystem::create_directories(dir, made);
  if (made)
    return Status::error("cannot create ", dir.string(), ": ", made.message());
  std::ifstream in(source + "/config.json");
  if (!in)
    return Status::error("cannot read ", source, "/config.json");
  std::stringstream text;
  text << in.rdbuf();
  std::string config = text.str();
  for (auto [key, value] : {std::pair<std::string, int>{"\"num_attention_heads\": 4", heads},
                            std::pair<std::string, int>{"\"num_key_value_heads\": 2", kvHeads},
                            std::pair<std::string, int>{"\"head_dim\": 16", headDim}}) {
    const size_t at = config.find(key);
    if (at == std::string::npos)
      return Status::error(source, "/config.json: no ", key);
    config.replace(at, key.size(), key.substr(0, key.find(':') + 2) + std::to_string(value));
  }
  if (!(std::ofstream(dir / "config.json") << config))
    return Status::error("cannot write ", (dir / "config.json").string());
  Expected<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::open(source + "/model.safetensors");
  if (!file)
    return file.status();
  const SafetensorsFile &f = **file;
  constexpr int64_t kRowBytes = 32 * 2; // rows of 32 bf16 columns
  // Every tensor the variant reshapes or takes rows of is bf16 of the
  // shape this code was written for.
  for (const TensorInfo &t : f.tensors()) {
    const bool matrix = t.name.find("_proj.weight") != std::string::npos || t.name.ends_with("mlp.gate.weight");
    const bool output = t.name.ends_with("o_proj.weight");
    if ((matrix || t.name.ends_with("_norm.weight")) && t.dtype != DType::BF16)
      return Status::error(source, "/model.safetensors: ", t.name, " is not bf16");
    if (output ? t.shape != std::vector<int64_t>{32, 64}
               : matrix && !t.name.ends_with("down_proj.weight") && (t.shape.size() != 2 || t.shape[1] != 32))
      return Status::error(source, "/model.safetensors: ", t.name, " is not the qwen3_moe fixture's shape");
  }
  auto bytesOf = [&](const std::string &name) -> Expected<std::vector<uint8_t>> {
    const TensorInfo *info = f.find(name);
    if (!info)
      return Status::error(source, "/model.safetensors: no tensor ", name);
    const std::span<const uint8_t> data = f.data(*info);
    return std::vector<uint8_t>(data.begin(), data.end());
  };
  // Each layer's pool of rows of 32 columns, and how many it has handed out.
  std::map<std::string, std::pair<std::vector<uint8_t>, size_t>> pools;
  auto rowsOf = [&](const std::string &layer, int64_t count) -> Expected<std::vector<uint8_t>> {
    auto &[pool, used] = pools[layer];
    if (pool.empty()) {
      for (const char *name :
           {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.gate.weight"}) {
        Expected<std::vector<uint8_t>> rows = bytesOf(layer + name);
        if (!rows)
          return rows.status();
        pool.insert(pool.end(), rows->begin(), rows->end());
      }
      for (int e = 0; e < 4; ++e)
        for (const char *name : {"gate_proj", "up_proj"}) {
          Expected<std::vector<uint8_t>> rows =
              bytesOf(layer + "mlp.experts." + std::to_string(e) + "." + name + ".weight");
          if (!rows)
            return rows.status();
          pool.insert(pool.end(), rows->begin(), rows->end());
        }
    }
    const size_t bytes = static_cast<size_t>(count * kRowBytes);
    if (used + bytes > pool.size())
      return Status::error("the variant needs more than the ", pool.size() / kRowBytes, " rows of ", layer);
    std::vector<uint8_t> rows(pool.begin() + static_cast<std::ptrdiff_t>(used),
                              pool.begin() + static_cast<std::ptrdiff_t>(used + bytes));
    used += bytes;
    return rows;
  };
  SafetensorsWriter writer;
  // q, k, v first in each layer (the pool hands out rows in that order).
  std::vector<const TensorInfo *> tensors;
  for (const TensorInfo &t : f.tensors())
    tensors.push_back(&t);
  std::stable_sort(tensors.begin(), tensors.end(), [](const TensorInfo *a, const TensorInfo *b) {
    const auto rank = [](const std::string &n) {
      return n.find("q_proj") != std::string::npos   ? 0
             : n.find("k_proj") != std::string::npos ? 1
             : n.find("v_proj") != std::string::npos ? 2
                                                     : 3;
    };
    return rank(a->name) < rank(b->name);
  });
  for (const TensorInfo *t : tensors) {
    const std::string &name = t->name;
    const size_t attentionAt = name.rfind("self_attn.");
    const std::string layer = name.substr(0, attentionAt == std::string::npos ? 0 : attentionAt);
    const std::string part = attentionAt == std::string::npos ? "" : name.substr(attentionAt + 10);
    Expected<std::vector<uint8_t>> read = bytesOf(name);
    if (!read)
      return read.status();
    std::vector<uint8_t> bytes = read.take();
    std::vector<int64_t> shape = t->shape;
    if (part == "q_proj.weight" || part == "k_proj.weight" || part == "v_proj.weight") {
      const int64_t rows = (part == "q_proj.weight" ? heads : kvHeads) * headDim;
      Expected<std::vector<uint8_t>> taken = rowsOf(layer, rows);
      if (!taken)
        return taken.status();
      bytes = std::move(*taken);
      shape = {rows, 32};
    } else if (part == "o_proj.weight") {
      // [32, 64] bf16: row r of the new [32, heads * headDim], from rows r
      // and (r + 1) % 32.
      const int64_t oldRow = 64 * 2, newRow = heads * headDim * 2;
      if (newRow > 2 * oldRow)
        return Status::error("o_proj's rows hold ", 2 * oldRow / 2, " values of two rows, not ", newRow / 2);
      std::vector<uint8_t> out(static_cast<size_t>(32 * newRow));
      for (int64_t r = 0; r < 32; ++r)
        for (int64_t c = 0; c < newRow; ++c)
          out[static_cast<size_t>(r * newRow + c)] =
              bytes[static_cast<size_t>((c < oldRow ? r : (r + 1) % 32) * oldRow + c % oldRow)];
      bytes = std::move(out);
      shape = {32, heads * headDim};
    } else if (part == "q_norm.weight" || part == "k_norm.weight") {
      std::vector<uint8_t> values(static_cast<size_t>(headDim * 2));
      for (size_t i = 0; i < values.size(); ++i)
        values[i] = bytes[i % bytes.size()];
      bytes = std::move(values);
      shape = {headDim};
    }
    MOE_RETURN_IF_ERROR(writer.addTensor(name, t->dtype, shape, std::move(bytes)));
  }
  return writer.write((dir / "model.safetensors").string());
}

} // namespace moe::testing
