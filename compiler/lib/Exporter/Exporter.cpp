//===- Exporter.cpp - moe module to a Hugging Face checkpoint -------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Exporter/Exporter.h"
#include "CompressedTensors.h"
#include "moe/Frontend/ModelSpec.h"
#include "moe/Frontend/Safetensors.h"
#include "moe/Lowering/TensorAccess.h"

#include "common/WeightFormat.h"

#include <nlohmann/json.hpp>

#include <cstring>

#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>

namespace moe {

using json = nlohmann::json;
using namespace mlir;

namespace {

/// The Hugging Face name of a tensor: its symbol without the ".drop"
/// suffixes passes add, with "experts.<old>." rewritten to `expertId`.
std::string outputName(StringRef symbol, std::optional<int64_t> expertId) {
  std::string name = symbol.str();
  while (name.size() > 5 && name.compare(name.size() - 5, 5, ".drop") == 0)
    name.resize(name.size() - 5);
  if (expertId) {
    static const std::regex expert(R"(\.experts\.[0-9]+\.)");
    name = std::regex_replace(name, expert, ".experts." + std::to_string(*expertId) + ".",
                              std::regex_constants::format_first_only);
  }
  return name;
}

/// The bf16 bytes of the values a quantised tensor's codes stand for.
Expected<std::vector<uint8_t>> dequantizeToBf16(ir::TensorOp tensor, ir::QuantAttr quant,
                                                const std::vector<int64_t> &shape, const std::vector<uint8_t> &codes) {
  const std::string where = "moe.tensor @" + tensor.getSymName().str();
  std::optional<quant::WeightFormat> format = quant::parseWeightFormat(quant.getFormat().str());
  if (!format || shape.size() != 2)
    return Status::error(where, ": format '", quant.getFormat().str(), "' of a ", shape.size(),
                         "-D tensor cannot be dequantised");
  const int64_t rows = shape[0], cols = shape[1];
  if (codes.size() != format->matrixBytes(rows, cols))
    return Status::error(where, ": ", codes.size(), " bytes of codes, ", format->name(), " [", rows, ", ", cols,
                         "] needs ", format->matrixBytes(rows, cols));
  std::vector<float> values(static_cast<size_t>(rows * cols));
  format->dequantize(codes.data(), rows, cols, values.data());
  std::vector<uint8_t> bytes(values.size() * 2);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t bits = quant::floatToScale(values[i], quant::ScaleType::BF16);
    std::memcpy(&bytes[2 * i], &bits, 2);
  }
  return bytes;
}

/// config.json's quantization_config: one group per scheme, targets named
/// exactly (disjoint, so every loader agrees), unquantised Linear modules
/// ignored (vLLM refuses a Linear that matches nothing).
json compressedTensorsConfig(const std::map<CtScheme, std::vector<std::string>> &schemes,
                             const std::vector<std::string> &ignore) {
  json groups = json::object();
  int index = 0;
  for (const auto &[scheme, modules] : schemes) {
    json weights = {{"dynamic", false},
                    {"num_bits", scheme.bits},
                    {"symmetric", scheme.symmetric},
                    {"type", "int"},
                    {"strategy", scheme.group > 0 ? "group" : "channel"},
                    {"group_size", scheme.group > 0 ? json(scheme.group) : json(nullptr)}};
    groups[concat("group_", index++)] = {{"format", "pack-quantized"},
                                         {"input_activations", nullptr},
                                         {"output_activations", nullptr},
                                         {"targets", modules},
                                         {"weights", weights}};
  }
  return {{"quant_method", "compressed-tensors"},
          {"format", "pack-quantized"},
          {"config_groups", groups},
          {"ignore", ignore},
          {"quantization_status", "compressed"},
          {"kv_cache_scheme", nullptr},
          {"global_compression_ratio", nullptr},
          {"sparsity_config", json::object()},
          {"transform_config", json::object()},
          {"version", "0.20.1"}};
}

Status writeText(const std::string &path, const std::string &text) {
  return writeFileAtomically(path,
                             std::span<const uint8_t>(reinterpret_cast<const uint8_t *>(text.data()), text.size()));
}

} // namespace

/// Config keys of a family's expert count and routed-expert width.
std::pair<const char *, const char *> configExpertKeys(ModelFamily family, const nlohmann::json &config) {
  switch (family) {
  case ModelFamily::Mixtral:
  case ModelFamily::PhiMoe:
    return {"num_local_experts", "intermediate_size"};
  case ModelFamily::Olmoe:
    return {config.contains("num_experts") ? "num_experts" : "num_local_experts", "intermediate_size"};
  case ModelFamily::Qwen2Moe:
  case ModelFamily::Qwen3Moe:
    return {config.contains("num_experts") ? "num_experts" : "num_local_experts", "moe_intermediate_size"};
  case ModelFamily::DeepseekV2:
  case ModelFamily::DeepseekV3:
    return {"n_routed_experts", "moe_intermediate_size"};
  }
  return {"num_experts", "moe_intermediate_size"};
}

Status exportHuggingFace(ir::ModelOp model, const std::string &directory, std::vector<std::string> *remarks,
                         QuantizedWeights quantized) {
  json config = json::parse(model.getConfig().str(), nullptr, false);
  if (config.is_discarded() || !config.is_object())
    return Status::error("moe.model @", model.getSymName().str(), ": its config is not a JSON object");
  Expected<ModelSpec> spec = ModelSpec::fromConfigText(model.getConfig(), "config of moe.model");
  if (!spec)
    return spec.status();

  // The per-layer structure must be uniform to fit a config.json.
  std::optional<int64_t> experts, width, topK, groups, topKGroups;
  std::map<std::string, std::optional<int64_t>> renamed; // symbol -> expert id
  for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>())
    for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>()) {
      ir::RouterOp router = *block.getBody().getOps<ir::RouterOp>().begin();
      int64_t count = 0;
      for (ir::ExpertOp expert : block.getBody().getOps<ir::ExpertOp>()) {
        if (expert.getPartOffset())
          return Status::error("layer ", layer.getIndex(), " expert ", expert.getId(),
                               " is split into parts (micro-expert mixed precision), which a ", spec->architecture,
                               " checkpoint cannot hold: use the package backend (moec emit)");
        ++count;
        int64_t w = static_cast<int64_t>(expert.getWidth());
        if (width && *width != w)
          return Status::error("layer ", layer.getIndex(), " expert ", expert.getId(), " has width ", w,
                               " but others have ", *width, "; a ", spec->architecture,
                               " config.json has one expert width: use the package backend (moec emit)");
        width = w;
        for (FlatSymbolRefAttr symbol : {expert.getGateAttr(), expert.getUpAttr(), expert.getDownAttr()})
          renamed[symbol.getValue().str()] = static_cast<int64_t>(expert.getId());
      }
      auto uniform = [&](std::optional<int64_t> &slot, int64_t value, const char *what) -> Status {
        if (slot && *slot != value)
          return Status::error("layer ", layer.getIndex(), " has ", value, " ", what, " but an earlier layer has ",
                               *slot, "; a ", spec->architecture,
                               " config.json cannot express per-layer values: use the package backend (moec emit)");
        slot = value;
        return Status::success();
      };
      MOE_RETURN_IF_ERROR(uniform(experts, count, "routed experts"));
      MOE_RETURN_IF_ERROR(uniform(topK, static_cast<int64_t>(router.getTopK()), "experts per token"));
      MOE_RETURN_IF_ERROR(uniform(groups, static_cast<int64_t>(router.getGroups()), "routing groups"));
      MOE_RETURN_IF_ERROR(uniform(topKGroups, static_cast<int64_t>(router.getTopKGroups()), "selected groups"));
      if (router.getRemap())
        return Status::error("layer ", layer.getIndex(), " routes through a remap table (merged experts); a ",
                             spec->architecture, " config.json cannot express it: use the package backend (moec emit)");
    }
  if (experts) {
    auto [countKey, widthKey] = configExpertKeys(spec->family, config);
    config[countKey] = *experts;
    config[widthKey] = *width;
    config["num_experts_per_tok"] = *topK;
    if (spec->family == ModelFamily::DeepseekV2 || spec->family == ModelFamily::DeepseekV3) {
      config["n_group"] = *groups;
      config["topk_group"] = *topKGroups;
    }
  }

  // Everything is written into a temporary directory beside `directory`
  // and published in one rename: a failed or killed export leaves the
  // previous output (or none), never a mix.
  Expected<std::unique_ptr<AtomicDirectory>> output = AtomicDirectory::create(directory);
  if (!output)
    return output.status();
  const std::string staging = (*output)->temporary();
  std::error_code error;
  TensorAccess access(model);
  SafetensorsWriter writer;
  std::map<CtScheme, std::vector<std::string>> schemes; // compressed-tensors: modules per scheme
  std::vector<std::string> unquantizedLinear;
  for (ir::TensorOp tensor : model.getBody().getOps<ir::TensorOp>()) {
    std::string symbol = tensor.getSymName().str();
    std::optional<int64_t> expertId;
    std::string base = symbol;
    if (base.size() > 10 && base.compare(base.size() - 10, 10, "_scale_inv") == 0)
      base.resize(base.size() - 10);
    if (auto it = renamed.find(base); it != renamed.end())
      expertId = it->second;
    DType dtype;
    std::vector<uint8_t> bytes;
    MOE_RETURN_IF_ERROR(access.read(tensor, dtype, bytes));
    std::vector<int64_t> shape(tensor.getTensorType().getShape().begin(), tensor.getTensorType().getShape().end());
    const std::string name = outputName(symbol, expertId);
    const bool linear = shape.size() == 2 && name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0 &&
                        name.find("embed_tokens") == std::string::npos;
    const std::string module = linear ? name.substr(0, name.size() - 7) : std::string();
    ir::QuantAttr quant = tensor.getQuantAttr();
    if (quantized == QuantizedWeights::CompressedTensors && quant && linear) {
      std::optional<quant::WeightFormat> format = quant::parseWeightFormat(quant.getFormat().str());
      if (!format)
        return Status::error("moe.tensor @", symbol, ": unknown format '", quant.getFormat().str(), "'");
      if (bytes.size() != format->matrixBytes(shape[0], shape[1]))
        return Status::error("moe.tensor @", symbol, ": ", bytes.size(), " bytes of ", format->name(), " codes, [",
                             shape[0], ", ", shape[1], "] needs ", format->matrixBytes(shape[0], shape[1]));
      CtScheme scheme;
      std::vector<CtTensor> packed;
      std::string remark;
      MOE_RETURN_IF_ERROR(toCompressedTensors(*format, bytes.data(), shape[0], shape[1], scheme, packed, remark));
      for (CtTensor &part : packed)
        MOE_RETURN_IF_ERROR(
            writer.addTensor(module + "." + part.suffix, part.dtype, std::move(part.shape), std::move(part.bytes)));
      schemes[scheme].push_back(module);
      if (remarks && !remark.empty())
        remarks->push_back(symbol + ": " + remark);
      continue;
    }
    if (linear)
      unquantizedLinear.push_back(module);
    // A Hugging Face checkpoint holds float tensors: quantised codes are
    // written as the bf16 values they stand for.
    if (quant) {
      Expected<std::vector<uint8_t>> values = dequantizeToBf16(tensor, quant, shape, bytes);
      if (!values)
        return values.status();
      bytes = std::move(*values);
      dtype = DType::BF16;
      if (remarks)
        remarks->push_back(concat(symbol, ": ", quant.getFormat().str(), " written as the bf16 values of its codes"));
    }
    MOE_RETURN_IF_ERROR(writer.addTensor(name, dtype, shape, std::move(bytes)));
  }
  if (quantized == QuantizedWeights::CompressedTensors) {
    if (schemes.empty())
      return Status::error("moe.model @", model.getSymName().str(),
                           ": nothing is quantised; --format compressed-tensors writes the quantised Linear modules "
                           "of a module after moe-quantize (use --format hf for a float checkpoint)");
    config["quantization_config"] = compressedTensorsConfig(schemes, unquantizedLinear);
  }
  writer.setMetadata("format", "pt");
  MOE_RETURN_IF_ERROR(writer.write(staging + "/model.safetensors"));
  MOE_RETURN_IF_ERROR(writeText(staging + "/config.json", config.dump(2) + "\n"));

  // Tokenizer and generation files travel with the weights.
  if (!model.getSources().empty()) {
    std::filesystem::path sourceDir =
        std::filesystem::path(llvm::cast<StringAttr>(model.getSources()[0]).getValue().str()).parent_path();
    for (const char *name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "generation_config.json", "tokenizer.model"}) {
      std::filesystem::path from = sourceDir / name;
      if (std::filesystem::exists(from)) {
        std::filesystem::copy_file(from, std::filesystem::path(staging) / name,
                                   std::filesystem::copy_options::overwrite_existing, error);
        if (error)
          return Status::error(from.string(), ": cannot copy: ", error.message());
      }
    }
  }
  return (*output)->commit();
}

} // namespace moe
