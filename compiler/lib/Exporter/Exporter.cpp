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

/// The Hugging Face name of a tensor: its symbol without the suffixes
/// passes add, with "experts.<old>." rewritten to `expertId`.
std::string outputName(StringRef symbol, std::optional<int64_t> expertId) {
  std::string name = symbol.str();
  while (name.size() > 5 && name.compare(name.size() - 5, 5, ".drop") == 0)
    name.resize(name.size() - 5);
  // Suffixes passes add after the checkpoint name (".weight.atoms",
  // ".weight.merged...") go too.
  if (size_t weight = name.rfind(".weight."); weight != std::string::npos && expertId)
    name.resize(weight + 7);
  if (expertId) {
    static const std::regex expert(R"(\.experts\.[0-9]+\.)");
    name = std::regex_replace(name, expert, ".experts." + std::to_string(*expertId) + ".",
                              std::regex_constants::format_first_only);
  }
  return name;
}

/// The bf16 bytes of the values a quantised tensor's codes stand for.
/// The bf16 bytes of `values`.
std::vector<uint8_t> bf16Bytes(const std::vector<float> &values) {
  std::vector<uint8_t> bytes(values.size() * 2);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t bits = floatToBfloat16(values[i]);
    std::memcpy(&bytes[2 * i], &bits, 2);
  }
  return bytes;
}

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
  return bf16Bytes(values);
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

/// Pads an expert matrix with zero neurons to `width`: rows of gate/up,
/// columns of down. Float tensors gain zero bytes; quantised ones become
/// their padded bf16 values (hf), or for compressed-tensors keep exact codes
/// where moec's symmetric format allows (zero codes with zero scales), else
/// give their padded values to requantize (`values`).
Status padExpert(ir::TensorOp tensor, ir::QuantAttr quant, bool down, int64_t width, QuantizedWeights mode,
                 DType &dtype, std::vector<int64_t> &shape, std::vector<uint8_t> &bytes,
                 std::optional<std::vector<float>> &values) {
  const int64_t rows = shape[0], cols = shape[1];
  const int64_t newRows = down ? rows : width, newCols = down ? width : cols;
  auto padBytes = [&](size_t element) {
    std::vector<uint8_t> out(static_cast<size_t>(newRows * newCols) * element, 0);
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(out.data() + static_cast<size_t>(r * newCols) * element,
                  bytes.data() + static_cast<size_t>(r * cols) * element, static_cast<size_t>(cols) * element);
    bytes = std::move(out);
  };
  if (!quant) {
    padBytes(dtypeBytes(dtype));
    shape = {newRows, newCols};
    return Status::success();
  }
  std::optional<quant::WeightFormat> format = quant::parseWeightFormat(quant.getFormat().str());
  if (!format)
    return Status::error("moe.tensor @", tensor.getSymName().str(), ": unknown format '", quant.getFormat().str(), "'");
  const std::optional<quant::QuantFormat> &group = format->group;
  if (mode == QuantizedWeights::CompressedTensors && group && group->symmetric && cols % group->group == 0 &&
      newCols % group->group == 0) {
    // Zero neurons in moec's own layout: groups of zero scale and zero codes.
    std::vector<uint8_t> zero(group->groupBytes(), 0);
    for (int64_t i = 0; i < group->group; ++i)
      quant::packCode(zero.data() + group->headerBytes(), group->bits, i, group->zeroPoint());
    std::vector<uint8_t> out;
    for (int64_t r = 0; r < newRows; ++r) {
      if (r < rows)
        out.insert(out.end(), bytes.begin() + r * group->rowBytes(cols),
                   bytes.begin() + (r + 1) * group->rowBytes(cols));
      for (int64_t g = r < rows ? group->groupsPerRow(cols) : 0; g < group->groupsPerRow(newCols); ++g)
        out.insert(out.end(), zero.begin(), zero.end());
    }
    bytes = std::move(out);
    shape = {newRows, newCols};
    return Status::success();
  }
  std::vector<float> original(static_cast<size_t>(rows * cols)), padded(static_cast<size_t>(newRows * newCols), 0.0f);
  format->dequantize(bytes.data(), rows, cols, original.data());
  for (int64_t r = 0; r < rows; ++r)
    std::copy_n(original.data() + r * cols, cols, padded.data() + r * newCols);
  shape = {newRows, newCols};
  if (mode == QuantizedWeights::CompressedTensors) {
    values = std::move(padded);
    return Status::success();
  }
  bytes = bf16Bytes(padded);
  dtype = DType::BF16;
  return Status::success();
}

Status writeText(const std::string &path, const std::string &text) { return writeTextAtomically(path, text); }

/// Where an expert tensor goes: the expert ids (router rows) it is written
/// as, whether it is a down projection (padded in columns), its width.
struct ExpertOut {
  std::vector<int64_t> ids;
  bool down = false;
  int64_t width = 0;
};

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
  if (remarks && model->getAttr("moe.task_sets"))
    remarks->push_back("the model's task expert sets do not carry into the checkpoint: it has every expert the sets "
                       "keep, routed over all of them");

  // The per-layer structure must be uniform to fit a config.json.
  // A config.json has one expert count and width: atom-pruned experts are
  // padded with zero neurons to the widest (a zero neuron adds nothing),
  // and experts merged by M-SMoE are written under every router row they
  // serve (a merged expert run with its members' summed weight equals each
  // member run with its own).
  std::optional<int64_t> experts, topK, groups, topKGroups;
  int64_t width = 0;
  std::map<std::string, ExpertOut> expertOut; // expert tensor symbol -> where it goes
  bool expanded = false;
  for (ir::LayerOp layer : model.getBody().getOps<ir::LayerOp>())
    for (ir::MoeBlockOp block : layer.getBody().getOps<ir::MoeBlockOp>()) {
      ir::RouterOp router = *block.getBody().getOps<ir::RouterOp>().begin();
      std::vector<ir::ExpertOp> slots;
      for (ir::ExpertOp expert : block.getBody().getOps<ir::ExpertOp>()) {
        if (expert.getLowRank())
          return Status::error("layer ", layer.getIndex(), " expert ", expert.getId(),
                               " is factored into a shared base and low-rank deltas (moe-factor-experts), which a ",
                               spec->architecture,
                               " checkpoint cannot hold: use the package backend (moec emit), or export the module "
                               "from before moe-factor-experts");
        if (expert.getPartOffset())
          return Status::error("layer ", layer.getIndex(), " expert ", expert.getId(),
                               " is split into parts (micro-expert mixed precision), which a ", spec->architecture,
                               " checkpoint cannot hold: use the package backend (moec emit) or --format gguf");
        slots.push_back(expert);
        width = std::max(width, static_cast<int64_t>(expert.getWidth()));
      }
      std::optional<ArrayRef<int64_t>> remap = router.getRemap();
      const int64_t count = remap ? static_cast<int64_t>(remap->size()) : static_cast<int64_t>(slots.size());
      expanded |= remap.has_value();
      for (int64_t row = 0; row < count; ++row) {
        ir::ExpertOp expert = slots[static_cast<size_t>(remap ? (*remap)[static_cast<size_t>(row)] : row)];
        const int64_t id = remap ? row : static_cast<int64_t>(expert.getId());
        int kind = 0;
        for (FlatSymbolRefAttr symbol : {expert.getGateAttr(), expert.getUpAttr(), expert.getDownAttr()}) {
          ExpertOut &out = expertOut[symbol.getValue().str()];
          out.ids.push_back(id);
          out.down = kind++ == 2;
          out.width = static_cast<int64_t>(expert.getWidth());
        }
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
    }
  // DeepSeek's shared experts are n_shared_experts of the routed width:
  // the padded width must keep their size.
  if ((spec->family == ModelFamily::DeepseekV2 || spec->family == ModelFamily::DeepseekV3) && width > 0) {
    const int64_t shared = config.value("n_shared_experts", json(0)).is_number_integer()
                               ? config.value("n_shared_experts", int64_t(0))
                               : 0;
    for (const LayerSpec &layer : spec->layers)
      if (shared > 0 && layer.shared.intermediateSize > 0) {
        if (layer.shared.intermediateSize % shared != 0)
          return Status::error("layer ", layer.index, ": the shared experts' width ", layer.shared.intermediateSize,
                               " is not n_shared_experts (", shared, ") routed widths");
        width = std::max(width, layer.shared.intermediateSize / shared);
      }
  }
  bool padded = false;
  for (const auto &[symbol, out] : expertOut)
    padded |= out.width != width;
  if (remarks && padded)
    remarks->push_back(
        concat("atom-pruned experts padded with zero neurons to ", width, " (config.json has one width)"));
  if (remarks && expanded)
    remarks->push_back("merged experts written under every router row they serve");
  if (experts) {
    auto [countKey, widthKey] = configExpertKeys(spec->family, config);
    config[countKey] = *experts;
    config[widthKey] = width;
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
    std::string base = symbol;
    const bool scaleInv = base.size() > 10 && base.compare(base.size() - 10, 10, "_scale_inv") == 0;
    if (scaleInv)
      base.resize(base.size() - 10);
    auto routed = expertOut.find(base);
    // Experts are written under each of their router rows, padded.
    const std::vector<std::optional<int64_t>> ids =
        routed == expertOut.end()
            ? std::vector<std::optional<int64_t>>{std::nullopt}
            : std::vector<std::optional<int64_t>>(routed->second.ids.begin(), routed->second.ids.end());
    for (const std::optional<int64_t> &expertId : ids) {
      DType dtype;
      std::vector<uint8_t> bytes;
      MOE_RETURN_IF_ERROR(access.read(tensor, dtype, bytes));
      std::vector<int64_t> shape(tensor.getTensorType().getShape().begin(), tensor.getTensorType().getShape().end());
      const std::string name = outputName(symbol, expertId);
      ir::QuantAttr quant = tensor.getQuantAttr();
      std::optional<std::vector<float>> paddedValues; // compressed-tensors: requantize these
      if (routed != expertOut.end() && routed->second.width != width) {
        if (scaleInv || dtype == DType::F8E4M3 || dtype == DType::F8E5M2)
          return Status::error("moe.tensor @", symbol, ": FP8 expert weights with block scales cannot be padded to ",
                               width, " neurons; export a module without atom pruning, or --format gguf");
        MOE_RETURN_IF_ERROR(
            padExpert(tensor, quant, routed->second.down, width, quantized, dtype, shape, bytes, paddedValues));
        if (quant && quantized == QuantizedWeights::Dequantized)
          quant = nullptr; // already the bf16 values
      }
      const bool linear = shape.size() == 2 && name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0 &&
                          name.find("embed_tokens") == std::string::npos;
      const std::string module = linear ? name.substr(0, name.size() - 7) : std::string();
      if (quantized == QuantizedWeights::CompressedTensors && quant && linear) {
        std::optional<quant::WeightFormat> format = quant::parseWeightFormat(quant.getFormat().str());
        if (!format)
          return Status::error("moe.tensor @", symbol, ": unknown format '", quant.getFormat().str(), "'");
        if (!paddedValues && bytes.size() != format->matrixBytes(shape[0], shape[1]))
          return Status::error("moe.tensor @", symbol, ": ", bytes.size(), " bytes of ", format->name(), " codes, [",
                               shape[0], ", ", shape[1], "] needs ", format->matrixBytes(shape[0], shape[1]));
        CtScheme scheme;
        std::vector<CtTensor> packed;
        std::string remark;
        if (paddedValues) {
          ctFromValues(*paddedValues, shape[0], shape[1], std::clamp(format->bits(), 2, 8),
                       !format->group || format->group->symmetric, format->block(), scheme, packed);
          remark = concat(format->name(), " requantized to compressed-tensors after padding to ", width, " neurons");
        } else {
          MOE_RETURN_IF_ERROR(toCompressedTensors(*format, bytes.data(), shape[0], shape[1], scheme, packed, remark));
        }
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
