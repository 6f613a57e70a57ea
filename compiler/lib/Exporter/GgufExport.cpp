//===- GgufExport.cpp - A compressed model as a llama.cpp GGUF file -------===//
//
// Part of moec. Tensor names, hyperparameter keys and their types follow
// llama.cpp's loader (each architecture's required keys and tensors, and
// nothing else: the loader refuses a file with a tensor it does not use).
//
//===----------------------------------------------------------------------===//

#include "moe/Exporter/GgufExport.h"
#include "common/GgmlFormats.h"
#include "common/QuantFormat.h"
#include "common/WeightFormat.h"
#include "moe/Exporter/Exporter.h"
#include "moe/Frontend/DType.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Runtime/Gguf.h"
#include "moe/Support/File.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <set>

namespace moe {

using json = nlohmann::json;
using quant::GgmlType;

namespace {

struct Arch {
  const char *name;
  bool permuteQk;      ///< llama's rope rotates adjacent pairs: Q/K rows are interleaved per head.
  bool outputRequired; ///< output.weight must be present (a copy of the embedding when tied).
};

Arch archOf(ModelFamily family) {
  switch (family) {
  case ModelFamily::Mixtral:
    return {"llama", true, false};
  case ModelFamily::Qwen2Moe:
    return {"qwen2moe", false, true};
  case ModelFamily::Qwen3Moe:
    return {"qwen3moe", false, false};
  case ModelFamily::Olmoe:
    return {"olmoe", false, true};
  case ModelFamily::DeepseekV2:
  case ModelFamily::DeepseekV3:
    return {"deepseek2", false, false};
  case ModelFamily::PhiMoe:
    return {"phimoe", false, true};
  }
  return {"llama", true, false};
}

/// Roles llama.cpp keeps in F32 whatever the model's dtype (norms, biases,
/// routers, as its converter and llama-quantize do).
bool keptInF32(TensorRole role, const std::vector<int64_t> &shape) {
  return shape.size() == 1 || role == TensorRole::Router || role == TensorRole::SharedExpertGate;
}

/// The ggml type a moec format converts to without changing a value, if
/// any: with fp16 scales, every 32 codes of a group (groups of 32, 64 or
/// 128) are a ggml block with the group's scale (and min).
std::optional<GgmlType> losslessType(const quant::QuantFormat &format) {
  if (format.group % 32 != 0 || format.scaleType != quant::ScaleType::F16)
    return std::nullopt;
  if (format.bits == 4)
    return format.symmetric ? GgmlType::Q4_0 : GgmlType::Q4_1;
  if (format.bits == 8 && format.symmetric)
    return GgmlType::Q8_0;
  return std::nullopt;
}

/// A [rows, cols] matrix's bytes in a lossless moec format (`format`) as
/// ggml blocks of `type`: each 32 codes of a group with the group's header
/// (Q8_0's codes are signed, moec's are q + 128). Bytes already in a ggml
/// format stay as they are.
void toGgmlBytes(GgmlType type, const std::string &format, std::vector<uint8_t> &bytes, int64_t rows, int64_t cols) {
  std::optional<quant::QuantFormat> moec = quant::parseQuantFormat(format);
  if (!moec)
    return;
  const size_t header = moec->headerBytes(), codeBytes = 32 * static_cast<size_t>(moec->bits) / 8;
  const size_t blockBytes = static_cast<size_t>(quant::ggmlTraits(type)->blockBytes);
  std::vector<uint8_t> out(static_cast<size_t>(rows * (cols / 32)) * blockBytes);
  uint8_t *target = out.data();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < cols / 32; ++b, target += blockBytes) {
      const uint8_t *group = bytes.data() + r * moec->rowBytes(cols) + (b * 32 / moec->group) * moec->groupBytes();
      std::memcpy(target, group, header);
      std::memcpy(target + header, group + header + ((b * 32) % moec->group) / 32 * codeBytes, codeBytes);
      if (type == GgmlType::Q8_0)
        for (size_t i = header; i < blockBytes; ++i)
          target[i] ^= 0x80;
    }
  bytes = std::move(out);
}

/// The ggml type of an unquantised tensor stored as `dtype`.
GgmlType floatType(DType dtype) {
  switch (dtype) {
  case DType::F32:
    return GgmlType::F32;
  case DType::F16:
    return GgmlType::F16;
  default:
    return GgmlType::BF16;
  }
}

/// `rows` x `cols` values encoded row by row as `type`.
std::vector<uint8_t> encode(GgmlType type, const std::vector<float> &values, int64_t rows, int64_t cols) {
  std::vector<uint8_t> bytes(quant::ggmlRowBytes(type, cols) * static_cast<size_t>(rows));
  quant::ggmlQuantizeRows(type, values.data(), rows, cols, bytes.data());
  return bytes;
}

/// llama's rope pairs adjacent dimensions, Hugging Face's the two halves
/// of a head: within each head of `rows / heads` rows, row 2i + j becomes
/// row j * (D / 2) + i. Whole rows move, so it applies to encoded rows.
void interleaveHeads(std::vector<uint8_t> &bytes, int64_t rows, int64_t heads) {
  const int64_t d = rows / heads;
  const size_t rowBytes = bytes.size() / static_cast<size_t>(rows);
  std::vector<uint8_t> out(bytes.size());
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < d / 2; ++i)
      for (int64_t j = 0; j < 2; ++j)
        std::memcpy(&out[static_cast<size_t>(h * d + 2 * i + j) * rowBytes],
                    &bytes[static_cast<size_t>(h * d + j * (d / 2) + i) * rowBytes], rowBytes);
  bytes = std::move(out);
}

/// Reads tensors of the description as stored bytes or float values.
class Reader {
public:
  explicit Reader(const ModelDescription &description) : reader(description) {}

  Status raw(const TensorRef &ref, DType &dtype, std::vector<uint8_t> &bytes) { return reader.read(ref, dtype, bytes); }
  /// The dtype and byte count raw() would give, from headers only.
  Status size(const TensorRef &ref, DType &dtype, uint64_t &bytes) { return reader.size(ref, dtype, bytes); }

  /// The values the tensor holds ([rows, cols] row-major), dequantising codes.
  Status floats(const TensorRef &ref, std::vector<float> &values) {
    DType dtype;
    std::vector<uint8_t> bytes;
    MOE_RETURN_IF_ERROR(reader.read(ref, dtype, bytes));
    const int64_t count = numElements(ref.shape);
    values.resize(static_cast<size_t>(count));
    if (!ref.format.empty()) {
      std::optional<quant::WeightFormat> format = quant::parseWeightFormat(ref.format);
      if (!format || ref.shape.size() != 2 || bytes.size() != format->matrixBytes(ref.shape[0], ref.shape[1]))
        return Status::error("tensor '", ref.name, "': ", bytes.size(), " bytes of '", ref.format,
                             "' codes do not make its shape");
      format->dequantize(bytes.data(), ref.shape[0], ref.shape[1], values.data());
      return Status::success();
    }
    if (bytes.size() != static_cast<size_t>(count) * dtypeBytes(dtype))
      return Status::error("tensor '", ref.name, "': ", bytes.size(), " bytes of ", dtypeName(dtype),
                           " do not make its shape");
    return convertToF32(dtype, bytes.data(), static_cast<size_t>(count), values.data());
  }

private:
  TensorReader reader;
};

/// One tensor of the file: its name, dimensions, type and how to make it.
struct Planned {
  std::string name;
  std::vector<int64_t> ne;
  GgmlType type;
  std::function<Status(std::vector<uint8_t> &)> produce;
};

struct Plan {
  std::vector<Planned> tensors;
  std::map<GgmlType, int64_t> elementsByType;
  void add(Planned planned) {
    elementsByType[planned.type] += numElements(planned.ne);
    tensors.push_back(std::move(planned));
  }
};

/// llama_ftype of the type most weights have.
uint32_t fileType(const Plan &plan) {
  GgmlType most = GgmlType::F32;
  int64_t count = -1;
  for (auto [type, elements] : plan.elementsByType)
    if (type != GgmlType::F32 && elements > count) {
      most = type;
      count = elements;
    }
  switch (most) {
  case GgmlType::F16:
    return 1;
  case GgmlType::Q4_0:
    return 2;
  case GgmlType::Q4_1:
    return 3;
  case GgmlType::Q8_0:
    return 7;
  case GgmlType::Q5_0:
    return 8;
  case GgmlType::Q5_1:
    return 9;
  case GgmlType::Q2_K:
    return 10;
  case GgmlType::Q3_K:
    return 12;
  case GgmlType::Q4_K:
    return 15;
  case GgmlType::Q5_K:
    return 17;
  case GgmlType::Q6_K:
    return 18;
  case GgmlType::BF16:
    return 32;
  default:
    return 0;
  }
}

// --- Tokenizer ---------------------------------------------------------------

std::string tokenText(const json &value) {
  if (value.is_string())
    return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string())
    return value["content"].get<std::string>();
  return "";
}

/// The pre-tokenizer regex of a tokenizer.json, or empty.
std::string splitRegex(const json &pre) {
  if (!pre.is_object())
    return "";
  if (pre.value("type", "") == "Split" && pre.contains("pattern") && pre["pattern"].is_object() &&
      pre["pattern"].contains("Regex") && pre["pattern"]["Regex"].is_string())
    return pre["pattern"]["Regex"].get<std::string>();
  if (pre.value("type", "") == "Sequence" && pre.contains("pretokenizers") && pre["pretokenizers"].is_array())
    for (const json &inner : pre["pretokenizers"]) {
      std::string regex = splitRegex(inner);
      if (!regex.empty())
        return regex;
    }
  return "";
}

bool hasByteLevel(const json &node) {
  if (!node.is_object())
    return false;
  if (node.value("type", "") == "ByteLevel")
    return true;
  for (const char *key : {"pretokenizers", "decoders"})
    if (node.contains(key) && node[key].is_array())
      for (const json &inner : node[key])
        if (hasByteLevel(inner))
          return true;
  return false;
}

Status writeTokenizer(const GgufAssets &assets, const ModelDescription &description, GgufWriter &writer,
                      std::vector<std::string> &remarks) {
  json tokenizer = json::parse(assets.tokenizerJson, nullptr, false);
  if (tokenizer.is_discarded() || !tokenizer.is_object() || !tokenizer.contains("model") ||
      !tokenizer["model"].is_object())
    return Status::error("tokenizer.json: not a Hugging Face tokenizer (no \"model\" object)");
  const json &model = tokenizer["model"];
  // Byte-level BPE (GPT-2 style: llama.cpp's "gpt2"), or SentencePiece-style
  // BPE over "▁"-joined words with byte fallback (Mixtral's, PhiMoE's:
  // llama.cpp's "llama", whose merges follow scores).
  const std::string metaspace = "\xe2\x96\x81";
  const bool byteLevel = hasByteLevel(tokenizer.value("pre_tokenizer", json()));
  const std::string normalizerText = tokenizer.value("normalizer", json()).dump();
  const std::string preText = tokenizer.value("pre_tokenizer", json()).dump();
  const bool sentencePiece =
      !byteLevel && (model.value("byte_fallback", false) || preText.find("Metaspace") != std::string::npos ||
                     normalizerText.find(metaspace) != std::string::npos);
  if (model.value("type", "") != "BPE" || !(byteLevel || sentencePiece) || !model.contains("vocab") ||
      !model["vocab"].is_object() || !model.contains("merges") || !model["merges"].is_array())
    return Status::error("tokenizer.json: moec writes GGUF tokenizers for BPE (model.type \"BPE\" with vocab and "
                         "merges), byte-level or SentencePiece-style; this one is '",
                         model.value("type", "?"), "'");
  const int64_t vocabSize = description.spec.vocabSize;
  std::vector<std::string> tokens(static_cast<size_t>(vocabSize));
  std::vector<int64_t> types(static_cast<size_t>(vocabSize), 5); // UNUSED until named
  std::map<std::string, int64_t> ids;
  auto place = [&](const std::string &text, int64_t id, int64_t type) -> Status {
    if (id < 0 || id >= vocabSize)
      return Status::error("tokenizer.json: token '", text, "' has id ", id, ", outside the model's vocabulary of ",
                           vocabSize);
    tokens[static_cast<size_t>(id)] = text;
    types[static_cast<size_t>(id)] = type;
    ids[text] = id;
    return Status::success();
  };
  for (const auto &[text, id] : model["vocab"].items())
    if (id.is_number_integer())
      MOE_RETURN_IF_ERROR(place(text, id.get<int64_t>(), 1));
  if (tokenizer.contains("added_tokens") && tokenizer["added_tokens"].is_array())
    for (const json &added : tokenizer["added_tokens"])
      if (added.is_object() && added.contains("id") && added["id"].is_number_integer())
        MOE_RETURN_IF_ERROR(place(tokenText(added), added["id"].get<int64_t>(), added.value("special", false) ? 3 : 4));
  for (int64_t i = 0; i < vocabSize; ++i)
    if (types[static_cast<size_t>(i)] == 5)
      tokens[static_cast<size_t>(i)] = "[PAD" + std::to_string(i) + "]";
  std::vector<std::string> merges;
  for (const json &merge : model["merges"]) {
    if (merge.is_string())
      merges.push_back(merge.get<std::string>());
    else if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string())
      merges.push_back(merge[0].get<std::string>() + " " + merge[1].get<std::string>());
    else
      return Status::error("tokenizer.json: model.merges holds ", merge.dump(),
                           " (expected \"a b\" or [\"a\", \"b\"])");
  }

  json config = json::parse(assets.tokenizerConfigJson.empty() ? "{}" : assets.tokenizerConfigJson, nullptr, false);
  json modelConfig = json::parse(description.configText.empty() ? "{}" : description.configText, nullptr, false);
  auto special = [&](const char *tokenKey, const char *idKey) -> std::optional<int64_t> {
    if (config.is_object() && config.contains(tokenKey)) {
      auto it = ids.find(tokenText(config[tokenKey]));
      if (it != ids.end())
        return it->second;
    }
    if (modelConfig.is_object() && modelConfig.contains(idKey) && modelConfig[idKey].is_number_integer()) {
      const int64_t id = modelConfig[idKey].get<int64_t>();
      if (id >= 0 && id < vocabSize)
        return id;
    }
    return std::nullopt;
  };
  auto specialIds = [&] {
    if (std::optional<int64_t> bos = special("bos_token", "bos_token_id"))
      writer.set("tokenizer.ggml.bos_token_id", GgufValue::u32(static_cast<uint32_t>(*bos)));
    if (std::optional<int64_t> eos = special("eos_token", "eos_token_id"))
      writer.set("tokenizer.ggml.eos_token_id", GgufValue::u32(static_cast<uint32_t>(*eos)));
    if (std::optional<int64_t> pad = special("pad_token", "pad_token_id"))
      writer.set("tokenizer.ggml.padding_token_id", GgufValue::u32(static_cast<uint32_t>(*pad)));
  };
  const json addBosValue = config.is_object() ? config.value("add_bos_token", json()) : json();

  if (sentencePiece) {
    // llama.cpp's SentencePiece tokenizer merges the adjacent pair whose
    // joined piece scores highest: a piece's score is minus the rank of the
    // merge that makes it, so merges happen in BPE's order. Byte-fallback
    // pieces <0xNN> are BYTE tokens, the unknown piece UNKNOWN.
    std::vector<double> scores(static_cast<size_t>(vocabSize), -1e9);
    for (size_t rank = 0; rank < merges.size(); ++rank) {
      const std::string &merge = merges[rank];
      const size_t space = merge.find(' ', 1);
      if (space == std::string::npos)
        continue;
      auto it = ids.find(merge.substr(0, space) + merge.substr(space + 1));
      if (it != ids.end() && scores[static_cast<size_t>(it->second)] == -1e9)
        scores[static_cast<size_t>(it->second)] = -static_cast<double>(rank);
    }
    for (int64_t i = 0; i < vocabSize; ++i) {
      const std::string &text = tokens[static_cast<size_t>(i)];
      if (types[static_cast<size_t>(i)] == 1 && text.size() == 6 && text.compare(0, 3, "<0x") == 0 && text[5] == '>')
        types[static_cast<size_t>(i)] = 6;
    }
    if (model.contains("unk_token") && model["unk_token"].is_string())
      if (auto it = ids.find(model["unk_token"].get<std::string>()); it != ids.end()) {
        types[static_cast<size_t>(it->second)] = 2;
        writer.set("tokenizer.ggml.unknown_token_id", GgufValue::u32(static_cast<uint32_t>(it->second)));
      }
    // A "▁" before the first word: Metaspace's prepend, or a normalizer's.
    const bool prefix =
        preText.find("\"prepend_scheme\":\"never\"") == std::string::npos &&
        (preText.find("Metaspace") != std::string::npos || normalizerText.find("Prepend") != std::string::npos);
    writer.set("tokenizer.ggml.model", GgufValue::string("llama"));
    writer.set("tokenizer.ggml.pre", GgufValue::string("default"));
    writer.set("tokenizer.ggml.tokens", GgufValue::stringArray(std::move(tokens)));
    writer.set("tokenizer.ggml.scores", GgufValue::f32Array(std::move(scores)));
    writer.set("tokenizer.ggml.token_type", GgufValue::i32Array(std::move(types)));
    specialIds();
    writer.set("tokenizer.ggml.add_bos_token",
               GgufValue::boolean(addBosValue.is_boolean() ? addBosValue.get<bool>() : true));
    writer.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(false));
    writer.set("tokenizer.ggml.add_space_prefix", GgufValue::boolean(prefix));
    return Status::success();
  }

  // llama.cpp knows pre-tokenizers by name; these are the regexes moec's
  // tokenizer reads.
  const std::string regex = splitRegex(tokenizer.value("pre_tokenizer", json()));
  static const std::pair<const char *, const char *> kPre[] = {
      {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
       "\\s+(?!\\S)|\\s+",
       "qwen2"},
      {"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
       "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
       "\\s+(?!\\S)|\\s+",
       "llama-bpe"},
      {"'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+", "gpt-2"},
  };
  std::string pre;
  for (const auto &[pattern, name] : kPre)
    if (regex == pattern)
      pre = name;
  if (pre.empty() && regex.empty())
    pre = "gpt-2"; // ByteLevel's own regex
  if (pre.empty()) {
    pre = "default";
    remarks.push_back("tokenizer.json: its pre-tokenizer regex is not one llama.cpp names; written as 'default' "
                      "(llama.cpp may split text differently from moec)");
  }

  writer.set("tokenizer.ggml.model", GgufValue::string("gpt2"));
  writer.set("tokenizer.ggml.pre", GgufValue::string(pre));
  writer.set("tokenizer.ggml.tokens", GgufValue::stringArray(std::move(tokens)));
  writer.set("tokenizer.ggml.token_type", GgufValue::i32Array(std::move(types)));
  writer.set("tokenizer.ggml.merges", GgufValue::stringArray(std::move(merges)));
  specialIds();
  writer.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(addBosValue.is_boolean() && addBosValue.get<bool>()));
  writer.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(false));
  return Status::success();
}

} // namespace

Expected<GgufAssets> readGgufAssets(const ModelDescription &description) {
  GgufAssets assets;
  const std::filesystem::path directory = description.assetDirectory;
  Expected<std::string> tokenizer = readWholeFile((directory / "tokenizer.json").string());
  if (!tokenizer)
    return Status::error("GGUF export needs the model's tokenizer.json: ", tokenizer.status().message());
  assets.tokenizerJson = std::move(*tokenizer);
  if (std::filesystem::exists(directory / "tokenizer_config.json")) {
    Expected<std::string> config = readWholeFile((directory / "tokenizer_config.json").string());
    if (!config)
      return config.status();
    assets.tokenizerConfigJson = std::move(*config);
  }
  return assets;
}

Status exportGguf(const ModelDescription &description, const GgufAssets &assets, const std::string &where,
                  const std::string &path, const GgufExportOptions &options, std::vector<std::string> &remarks) {
  const ModelSpec &spec = description.spec;
  const Arch arch = archOf(spec.family);
  const std::string prefix = std::string(arch.name) + ".";
  if (!description.taskSets.empty())
    remarks.push_back(concat(where, ": its ", description.taskSets.size(),
                             " task expert sets do not carry into GGUF: the file has every expert the sets keep, and "
                             "llama.cpp routes over all of them"));
  json config = json::parse(description.configText.empty() ? "{}" : description.configText, nullptr, false);
  if (!config.is_object())
    config = json::object();

  // --- What GGUF can express ---------------------------------------------
  int64_t experts = -1, width = 0, firstMoe = -1;
  std::vector<int64_t> topKs;
  bool uniformTopK = true;
  for (size_t l = 0; l < description.layers.size(); ++l) {
    const LayerEntry &layer = description.layers[l];
    const RouterSpec &router = layer.routing.router ? *layer.routing.router : spec.router;
    if (spec.layers[l].mlp != MlpKind::Moe) {
      topKs.push_back(-1);
      continue;
    }
    if (firstMoe < 0)
      firstMoe = static_cast<int64_t>(l);
    if (layer.expertBase)
      return Status::error(where, ": layer ", l, " has factored experts (moe-factor-experts: a shared base plus ",
                           "low-rank deltas), which no llama.cpp tensor layout holds; run the package (moec emit), ",
                           "or export the module from before moe-factor-experts");
    if (layer.routing.skipThreshold > 0)
      return Status::error(where, ": layer ", l, " skips experts dynamically (threshold ", layer.routing.skipThreshold,
                           "); llama.cpp runs every chosen expert, so the GGUF model ",
                           "would not compute what the compressed model does. Export the module from before "
                           "moe-dynamic-skip");
    if (!layer.routing.remap.empty() && !options.expandMerged)
      return Status::error(where, ": layer ", l, " has merged experts (a router remap table), which GGUF cannot ",
                           "hold; without --no-expand-merged they are written into each member's slot");
    const int64_t rows = layer.routing.remap.empty() ? static_cast<int64_t>(layer.experts.size())
                                                     : static_cast<int64_t>(layer.routing.remap.size());
    if (experts >= 0 && rows != experts)
      return Status::error(
          where, ": layer ", l, " routes to ", rows, " experts but an earlier layer to ", experts,
          "; llama.cpp's expert_count is one number for the model (use the package backend, moec emit)");
    experts = rows;
    topKs.push_back(router.topK);
    if (topKs.size() > 1 && topKs[static_cast<size_t>(firstMoe)] != router.topK)
      uniformTopK = false;
    for (const ExpertEntry &expert : layer.experts)
      width = std::max(width, expert.width);
  }
  if (experts < 0)
    return Status::error(where, ": the model has no MoE layer");
  // Shared experts of DeepSeek are n_shared experts of the routed width.
  int64_t sharedCount = 0;
  if (arch.name == std::string("deepseek2")) {
    sharedCount =
        config.value("n_shared_experts", json(0)).is_number_integer() ? config.value("n_shared_experts", 0) : 0;
    for (const LayerSpec &layer : spec.layers)
      if (sharedCount > 0 && layer.shared.intermediateSize > 0)
        width = std::max(width, (layer.shared.intermediateSize + sharedCount - 1) / sharedCount);
  }
  // Rows of the down projections are whole 32-value blocks.
  const int64_t paddedWidth = (width + 31) / 32 * 32;
  if (paddedWidth != width)
    remarks.push_back(concat("experts padded with zero neurons to ", paddedWidth, " (whole blocks of 32)"));
  width = paddedWidth;
  for (size_t l = 0; l < description.layers.size(); ++l)
    if (spec.layers[l].mlp == MlpKind::Moe)
      for (const ExpertEntry &expert : description.layers[l].experts)
        if (expert.width != width && expert.width != spec.layers[l].expertIntermediateSize) {
          remarks.push_back(concat("layer ", l, ": atom-pruned experts padded with zero neurons to ", width));
          break;
        }
  if (spec.family == ModelFamily::Qwen2Moe || spec.family == ModelFamily::Qwen3Moe ||
      spec.family == ModelFamily::Olmoe || spec.family == ModelFamily::Mixtral || spec.family == ModelFamily::PhiMoe)
    for (const LayerSpec &layer : spec.layers)
      if (layer.mlp != MlpKind::Moe)
        return Status::error(where, ": layer ", layer.index, " is dense; llama.cpp's ", arch.name,
                             " expects every layer to be MoE");
  // Routing llama.cpp's graphs fix per architecture.
  const bool renormalises =
      spec.family == ModelFamily::Mixtral || spec.family == ModelFamily::Qwen3Moe || spec.family == ModelFamily::PhiMoe;
  if (arch.name != std::string("deepseek2") && spec.router.normalizeTopK != renormalises)
    remarks.push_back(concat("llama.cpp's ", arch.name, " graph ",
                             renormalises ? "renormalises" : "does not renormalise",
                             " the chosen experts' weights; this model ",
                             spec.router.normalizeTopK ? "does" : "does not", " (perplexities will differ)"));
  if (spec.family == ModelFamily::PhiMoe)
    remarks.push_back("llama.cpp runs phimoe with its phi3 graph (RMSNorm with bias, softmax top-k routing), not "
                      "PhiMoE's LayerNorm and sparsemixer: its perplexity will differ from moec's");
  if (spec.router.selection == ExpertSelection::GroupLimitedMax)
    remarks.push_back("llama.cpp scores expert groups by the sum of their top two scores; this model (DeepSeek-V2) "
                      "by their maximum");

  // --- Hyperparameters ---------------------------------------------------
  GgufWriter writer;
  auto u32 = [&](const std::string &key, int64_t value) {
    writer.set(prefix + key, GgufValue::u32(static_cast<uint32_t>(value)));
  };
  auto f32 = [&](const std::string &key, double value) {
    writer.set(prefix + key, GgufValue::f32(static_cast<float>(value)));
  };
  writer.set("general.architecture", GgufValue::string(arch.name));
  writer.set("general.name", GgufValue::string(spec.modelType + " (moec)"));
  writer.set("general.quantization_version", GgufValue::u32(2));
  const AttentionSpec &attention = spec.attention;
  u32("context_length", spec.maxPositions);
  u32("embedding_length", spec.hiddenSize);
  u32("block_count", spec.numLayers);
  u32("vocab_size", spec.vocabSize);
  f32("attention.layer_norm_rms_epsilon", spec.normEps);
  f32("rope.freq_base", spec.rope.theta);
  u32("attention.head_count", attention.numHeads);
  u32("expert_count", experts);
  if (uniformTopK) {
    u32("expert_used_count", topKs[static_cast<size_t>(firstMoe)]);
  } else {
    std::vector<int64_t> perLayer;
    for (int64_t k : topKs)
      perLayer.push_back(k < 0 ? topKs[static_cast<size_t>(firstMoe)] : k);
    GgufValue value = GgufValue::i32Array(perLayer);
    value.elementType = GgufType::U32;
    writer.set(prefix + "expert_used_count", value);
  }
  if (arch.name == std::string("deepseek2")) {
    int64_t dense = 0, denseWidth = 0;
    for (const LayerSpec &layer : spec.layers)
      if (layer.mlp == MlpKind::Dense) {
        ++dense;
        denseWidth = layer.denseIntermediateSize;
      }
    // Multi-head latent attention as llama.cpp's non-MLA path reads it:
    // attn_kv_b whole, keys and values per head.
    u32("attention.head_count_kv", attention.numHeads);
    u32("feed_forward_length", denseWidth > 0 ? denseWidth : width);
    u32("leading_dense_block_count", dense);
    u32("attention.q_lora_rank", attention.queryLoraRank);
    u32("attention.kv_lora_rank", attention.kvLoraRank);
    u32("attention.key_length", attention.qkNopeHeadDim + attention.qkRopeHeadDim);
    u32("attention.value_length", attention.valueHeadDim);
    u32("rope.dimension_count", attention.qkRopeHeadDim);
    u32("expert_feed_forward_length", width);
    u32("expert_shared_count", sharedCount);
    f32("expert_weights_scale", spec.router.scalingFactor);
    writer.set(prefix + "expert_weights_norm", GgufValue::boolean(spec.router.normalizeTopK));
    u32("expert_gating_func", spec.router.scoring == RouterScoring::Sigmoid ? 2 : 1);
    if (spec.router.numGroups > 1 && spec.router.topKGroups < spec.router.numGroups) {
      u32("expert_group_count", spec.router.numGroups);
      u32("expert_group_used_count", spec.router.topKGroups);
    }
    if (spec.rope.scaling == RopeScalingKind::Yarn) {
      writer.set(prefix + "rope.scaling.type", GgufValue::string("yarn"));
      f32("rope.scaling.factor", spec.rope.factor);
      u32("rope.scaling.original_context_length", spec.rope.originalMaxPositions);
      f32("rope.scaling.yarn_log_multiplier", 0.1 * spec.rope.mscaleAllDim);
      if (spec.rope.mscaleAllDim != 0 && spec.rope.mscale != spec.rope.mscaleAllDim)
        remarks.push_back("llama.cpp's deepseek2 takes YaRN's mscale equal to mscale_all_dim; this model's differ");
    }
  } else {
    u32("attention.head_count_kv", attention.numKeyValueHeads);
    u32("attention.key_length", attention.headDim);
    u32("attention.value_length", attention.valueHeadDim > 0 ? attention.valueHeadDim : attention.headDim);
    u32("rope.dimension_count", spec.rope.rotaryDim > 0 ? spec.rope.rotaryDim : attention.headDim);
    if (spec.family == ModelFamily::Qwen2Moe || spec.family == ModelFamily::Qwen3Moe) {
      u32("feed_forward_length", width);
      u32("expert_feed_forward_length", width);
      if (spec.family == ModelFamily::Qwen2Moe)
        u32("expert_shared_feed_forward_length", spec.layers[static_cast<size_t>(firstMoe)].shared.intermediateSize);
    } else {
      u32("feed_forward_length", width);
    }
    if (spec.rope.scaling == RopeScalingKind::Linear) {
      writer.set(prefix + "rope.scaling.type", GgufValue::string("linear"));
      f32("rope.scaling.factor", spec.rope.factor);
    } else if (spec.rope.scaling == RopeScalingKind::LongRope) {
      u32("rope.scaling.original_context_length", spec.rope.originalMaxPositions);
      const double scale = static_cast<double>(spec.maxPositions) / static_cast<double>(spec.rope.originalMaxPositions);
      if (scale > 1.0)
        f32("rope.scaling.attn_factor",
            std::sqrt(1.0 + std::log(scale) / std::log(static_cast<double>(spec.rope.originalMaxPositions))));
    } else if (spec.rope.scaling != RopeScalingKind::None) {
      return Status::error(where, ": rope scaling '", ropeScalingName(spec.rope.scaling), "' of a ", arch.name,
                           " model is not one moec writes to GGUF");
    }
    if (attention.clipQkv > 0)
      remarks.push_back("llama.cpp's olmoe graph does not clamp q, k and v (clip_qkv); perplexities may differ");
  }
  MOE_RETURN_IF_ERROR(writeTokenizer(assets, description, writer, remarks));
  // What moec needs to run the file again (llama.cpp ignores these keys):
  // the config with the structure as exported (expert count and padded
  // width, top-k), and the tokenizer files as they were.
  json exportedConfig = config;
  auto [countKey, widthKey] = configExpertKeys(spec.family, config);
  exportedConfig[countKey] = experts;
  exportedConfig[widthKey] = width;
  exportedConfig["num_experts_per_tok"] = topKs[static_cast<size_t>(firstMoe)];
  if (spec.family == ModelFamily::Qwen2Moe)
    exportedConfig["shared_expert_intermediate_size"] =
        spec.layers[static_cast<size_t>(firstMoe)].shared.intermediateSize;
  writer.set("moec.config_json", GgufValue::string(exportedConfig.dump()));
  writer.set("moec.tokenizer_json", GgufValue::string(assets.tokenizerJson));
  if (!assets.tokenizerConfigJson.empty())
    writer.set("moec.tokenizer_config_json", GgufValue::string(assets.tokenizerConfigJson));

  // --- Tensors ------------------------------------------------------------
  auto reader = std::make_shared<Reader>(description);
  Plan plan;
  // A single (non-expert) tensor.
  auto planTensor = [&](const std::string &name, TensorRole role, const TensorRef &ref, int64_t permuteHeads,
                        std::vector<std::string> &notes) -> Status {
    const std::vector<int64_t> &shape = ref.shape;
    const int64_t rows = shape.size() == 2 ? shape[0] : 1, cols = shape.back();
    std::vector<int64_t> ne = shape.size() == 2 ? std::vector<int64_t>{cols, rows} : std::vector<int64_t>{cols};
    GgmlType type;
    bool copy = false;
    if (keptInF32(role, shape)) {
      type = GgmlType::F32;
    } else if (quant::ggmlBlockFormat(ref.format)) {
      type = quant::ggmlBlockFormat(ref.format)->type; // already llama.cpp's bytes
      copy = true;
    } else if (!ref.format.empty()) {
      std::optional<quant::QuantFormat> format = quant::parseQuantFormat(ref.format);
      if (!format)
        return Status::error(where, ": tensor '", ref.name, "' has format '", ref.format, "', unknown to moec");
      std::optional<GgmlType> lossless = losslessType(*format);
      if (lossless && cols % 32 == 0) {
        type = *lossless;
        copy = true;
      } else {
        type = quant::ggmlTypeForBits(format->bits, cols);
        notes.push_back(concat(name, ": ", ref.format, " requantized to ", quant::ggmlTraits(type)->ggmlName,
                               " from the values its codes stand for"));
      }
    } else {
      DType dtype;
      uint64_t bytes;
      MOE_RETURN_IF_ERROR(reader->size(ref, dtype, bytes));
      type = floatType(dtype);
      if (dtype != DType::BF16 && dtype != DType::F16 && dtype != DType::F32)
        notes.push_back(concat(name, ": ", dtypeName(dtype), " written as BF16"));
      copy = dtype == DType::BF16 || dtype == DType::F16 || dtype == DType::F32;
    }
    TensorRef source = ref;
    plan.add({name, ne, type, [reader, source, type, rows, cols, copy, permuteHeads](std::vector<uint8_t> &bytes) {
                if (copy) {
                  DType dtype;
                  MOE_RETURN_IF_ERROR(reader->raw(source, dtype, bytes));
                  toGgmlBytes(type, source.format, bytes, rows, cols);
                } else {
                  std::vector<float> values;
                  MOE_RETURN_IF_ERROR(reader->floats(source, values));
                  bytes = encode(type, values, rows, cols);
                }
                if (permuteHeads > 0)
                  interleaveHeads(bytes, rows, permuteHeads);
                return Status::success();
              }});
    return Status::success();
  };

  std::vector<std::string> notes;
  const TensorRef *embedding = nullptr;
  bool hasLmHead = false;
  for (const auto &[role, ref] : description.globals) {
    if (role == TensorRole::Embedding)
      embedding = &ref;
    hasLmHead |= role == TensorRole::LmHead;
  }
  for (const auto &[role, ref] : description.globals) {
    const char *name = ggufRoleName(role);
    if (!name)
      return Status::error(where, ": a ", tensorRoleName(role), " tensor has no GGUF name");
    MOE_RETURN_IF_ERROR(planTensor(name, role, ref, 0, notes));
  }
  if (!hasLmHead && arch.outputRequired && embedding)
    MOE_RETURN_IF_ERROR(planTensor("output.weight", TensorRole::LmHead, *embedding, 0, notes));
  // Biases llama.cpp's phimoe requires: zeros when the model has none (exact).
  auto zeros = [&](const std::string &name, int64_t count) {
    plan.add({name, {count}, GgmlType::F32, [count](std::vector<uint8_t> &bytes) {
                bytes.assign(static_cast<size_t>(count) * 4, 0);
                return Status::success();
              }});
  };
  const bool phimoe = spec.family == ModelFamily::PhiMoe;
  if (phimoe && std::none_of(description.globals.begin(), description.globals.end(),
                             [](const auto &global) { return global.first == TensorRole::LmHeadBias; }))
    zeros("output.bias", spec.vocabSize);
  if (spec.family == ModelFamily::PhiMoe && spec.rope.scaling == RopeScalingKind::LongRope)
    for (const auto &[name, factors] :
         {std::pair<std::string, std::vector<double>>{"rope_factors_long.weight", spec.rope.longFactor},
          std::pair<std::string, std::vector<double>>{"rope_factors_short.weight", spec.rope.shortFactor}}) {
      std::vector<float> values(factors.begin(), factors.end());
      plan.add({name, {static_cast<int64_t>(values.size())}, GgmlType::F32, [values](std::vector<uint8_t> &bytes) {
                  bytes.resize(values.size() * 4);
                  std::memcpy(bytes.data(), values.data(), bytes.size());
                  return Status::success();
                }});
    }

  for (size_t l = 0; l < description.layers.size(); ++l) {
    const LayerEntry &layer = description.layers[l];
    const std::string blk = concat("blk.", l, ".");
    for (const auto &[role, ref] : layer.tensors) {
      const char *name = ggufRoleName(role);
      if (!name)
        return Status::error(where, ": layer ", l, ": a ", tensorRoleName(role), " tensor has no GGUF name");
      int64_t heads = 0;
      if (arch.permuteQk && (role == TensorRole::QueryProj || role == TensorRole::QueryBias))
        heads = attention.numHeads;
      if (arch.permuteQk && (role == TensorRole::KeyProj || role == TensorRole::KeyBias))
        heads = attention.numKeyValueHeads;
      TensorRef padded = ref;
      const bool shared =
          role == TensorRole::SharedGate || role == TensorRole::SharedUp || role == TensorRole::SharedDown;
      if (shared && sharedCount > 0 && width * sharedCount != spec.layers[l].shared.intermediateSize) {
        // DeepSeek's shared experts are n_shared routed widths: padded with zero neurons.
        const int64_t target = width * sharedCount;
        const bool down = role == TensorRole::SharedDown;
        const int64_t rows = down ? ref.shape[0] : target, cols = down ? target : ref.shape[1];
        GgmlType type = ref.format.empty() ? GgmlType::BF16
                                           : quant::ggmlTypeForBits(quant::parseWeightFormat(ref.format)->bits(), cols);
        const TensorRef source = ref;
        plan.add({blk + name, {cols, rows}, type, [reader, source, type, rows, cols](std::vector<uint8_t> &bytes) {
                    std::vector<float> values, out(static_cast<size_t>(rows * cols), 0.0f);
                    MOE_RETURN_IF_ERROR(reader->floats(source, values));
                    for (int64_t r = 0; r < source.shape[0]; ++r)
                      for (int64_t c = 0; c < source.shape[1]; ++c)
                        out[static_cast<size_t>(r * cols + c)] = values[static_cast<size_t>(r * source.shape[1] + c)];
                    bytes = encode(type, out, rows, cols);
                    return Status::success();
                  }});
        continue;
      }
      MOE_RETURN_IF_ERROR(planTensor(blk + name, role, padded, heads, notes));
    }
    if (phimoe && std::none_of(layer.tensors.begin(), layer.tensors.end(),
                               [](const auto &tensor) { return tensor.first == TensorRole::OutputBias; }))
      zeros(blk + "attn_output.bias", spec.hiddenSize);
    if (spec.layers[l].mlp != MlpKind::Moe)
      continue;

    // Routed experts, one stacked tensor per matrix, router row order.
    std::vector<const ExpertEntry *> slots;
    if (layer.routing.remap.empty())
      for (const ExpertEntry &expert : layer.experts)
        slots.push_back(&expert);
    else
      for (int32_t slot : layer.routing.remap)
        slots.push_back(&layer.experts[static_cast<size_t>(slot)]);
    if (!layer.routing.remap.empty())
      remarks.push_back(concat("layer ", l, ": ", layer.experts.size(), " merged experts written into the ",
                               slots.size(), " router slots they serve"));
    const int64_t hidden = spec.hiddenSize;
    for (int m = 0; m < 3; ++m) {
      const bool down = m == 2;
      const char *name = m == 0 ? "ffn_gate_exps.weight" : m == 1 ? "ffn_up_exps.weight" : "ffn_down_exps.weight";
      auto partsOf = [m](const ExpertEntry &expert) {
        std::vector<const TensorRef *> parts = {m == 0 ? &expert.gate : m == 1 ? &expert.up : &expert.down};
        for (const ExpertPart &part : expert.moreParts)
          parts.push_back(m == 0 ? &part.gate : m == 1 ? &part.up : &part.down);
        return parts;
      };
      const int64_t rows = down ? hidden : width, cols = down ? width : hidden;
      // One type for the stacked tensor: the experts' own when they agree
      // and it converts losslessly, else the nearest to their mean width.
      std::set<std::string> formats;
      double bitSum = 0, parameterSum = 0;
      bool split = false;
      for (const ExpertEntry *expert : slots)
        for (const TensorRef *part : partsOf(*expert)) {
          formats.insert(part->format);
          split |= !expert->moreParts.empty();
          std::optional<quant::WeightFormat> format = quant::parseWeightFormat(part->format);
          const double parameters = static_cast<double>(numElements(part->shape));
          bitSum += parameters * (format ? format->bits() : 16);
          parameterSum += parameters;
        }
      GgmlType type;
      bool copy = false;
      const std::string only = formats.size() == 1 ? *formats.begin() : std::string("?");
      std::optional<quant::QuantFormat> onlyFormat = quant::parseQuantFormat(only);
      const quant::GgmlTraits *onlyGgml = quant::ggmlBlockFormat(only);
      if (onlyGgml && !split) {
        // Already llama.cpp's blocks: copied; down rows padded with zero
        // blocks when the width is whole blocks, else requantized.
        type = onlyGgml->type;
        copy = true;
        for (const ExpertEntry *expert : slots)
          copy &= !down || expert->width % onlyGgml->blockSize == 0;
        if (!copy) {
          type = quant::ggmlTypeForBits(onlyGgml->bits, cols);
          notes.push_back(concat(blk, name, ": ", only, " requantized to ", quant::ggmlTraits(type)->ggmlName,
                                 " (an atom-pruned width that is not whole blocks)"));
        }
      } else if (formats.size() == 1 && only.empty()) {
        DType dtype;
        uint64_t bytes;
        MOE_RETURN_IF_ERROR(reader->size(slots[0]->gate, dtype, bytes));
        type = floatType(dtype);
      } else if (onlyFormat && losslessType(*onlyFormat) && !split) {
        type = *losslessType(*onlyFormat);
        // Whole rows of whole blocks: padding is zero blocks (d = 0).
        copy = true;
        for (const ExpertEntry *expert : slots)
          copy &= expert->width % 32 == 0;
        if (!copy)
          notes.push_back(concat(blk, name, ": ", only, " requantized to ", quant::ggmlTraits(type)->ggmlName,
                                 " (padding a width that is not whole blocks)"));
      } else {
        type = quant::ggmlTypeForBits(bitSum / parameterSum, cols);
        std::string list;
        for (const std::string &format : formats)
          list += (list.empty() ? "" : ", ") + (format.empty() ? std::string("float") : format);
        if (formats.size() == 1 && !split)
          notes.push_back(concat(blk, name, ": ", list, " is no ggml type: requantized to ",
                                 quant::ggmlTraits(type)->ggmlName, " from the values its codes stand for"));
        else
          notes.push_back(concat(blk, name, ": experts in ", list, split ? " (split into parts)" : "",
                                 " requantized to one ", quant::ggmlTraits(type)->ggmlName, " (", bitSum / parameterSum,
                                 " bits on average; a GGUF tensor has one type)"));
      }
      const size_t rowBytes = quant::ggmlRowBytes(type, cols);
      std::vector<std::vector<TensorRef>> expertParts;
      for (const ExpertEntry *expert : slots) {
        std::vector<TensorRef> parts;
        for (const TensorRef *part : partsOf(*expert))
          parts.push_back(*part);
        expertParts.push_back(std::move(parts));
      }
      plan.add({blk + name,
                {cols, rows, static_cast<int64_t>(slots.size())},
                type,
                [reader, expertParts, type, rows, cols, down, copy, rowBytes](std::vector<uint8_t> &bytes) {
                  bytes.assign(rowBytes * static_cast<size_t>(rows) * expertParts.size(), 0);
                  for (size_t e = 0; e < expertParts.size(); ++e) {
                    uint8_t *out = bytes.data() + e * rowBytes * static_cast<size_t>(rows);
                    if (copy) {
                      // One part in a lossless format: rows copied; gate/up
                      // gain zero rows, down rows gain zero blocks.
                      DType dtype;
                      std::vector<uint8_t> raw;
                      MOE_RETURN_IF_ERROR(reader->raw(expertParts[e][0], dtype, raw));
                      toGgmlBytes(type, expertParts[e][0].format, raw, expertParts[e][0].shape[0],
                                  expertParts[e][0].shape[1]);
                      const int64_t partRows = expertParts[e][0].shape[0];
                      const size_t partRowBytes = raw.size() / static_cast<size_t>(partRows);
                      for (int64_t r = 0; r < partRows; ++r)
                        std::memcpy(out + static_cast<size_t>(r) * rowBytes, raw.data() + r * partRowBytes,
                                    partRowBytes);
                      continue;
                    }
                    // Values of every part, neurons concatenated, zero-padded.
                    std::vector<float> values(static_cast<size_t>(rows * cols), 0.0f), part;
                    int64_t offset = 0;
                    for (const TensorRef &ref : expertParts[e]) {
                      MOE_RETURN_IF_ERROR(reader->floats(ref, part));
                      const int64_t partRows = ref.shape[0], partCols = ref.shape[1];
                      for (int64_t r = 0; r < partRows; ++r)
                        for (int64_t c = 0; c < partCols; ++c)
                          values[static_cast<size_t>(down ? r * cols + offset + c : (offset + r) * cols + c)] =
                              part[static_cast<size_t>(r * partCols + c)];
                      offset += down ? partCols : partRows;
                    }
                    std::vector<uint8_t> encoded = encode(type, values, rows, cols);
                    std::memcpy(out, encoded.data(), encoded.size());
                  }
                  return Status::success();
                }});
    }
  }
  for (std::string &note : notes)
    remarks.push_back(std::move(note));

  writer.set("general.file_type", GgufValue::u32(fileType(plan)));
  for (const Planned &planned : plan.tensors)
    MOE_RETURN_IF_ERROR(writer.addTensor(planned.name, planned.ne, planned.type));
  return writer.write(path, [&](size_t index, std::vector<uint8_t> &bytes) -> Status {
    Status status = plan.tensors[index].produce(bytes);
    if (!status.ok())
      return Status::error(where, ": ", plan.tensors[index].name, ": ", status.message());
    return status;
  });
}

} // namespace moe
