//===- SyntheticCheckpoint.cpp - Tiny random checkpoints for tests --------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/SyntheticCheckpoint.h"
#include "moe/Frontend/Checkpoint.h"
#include "moe/Frontend/Safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <sys/stat.h>

namespace moe {

using json = nlohmann::json;

namespace {

json baseConfig(const char *architecture, const char *modelType) {
  return json{{"architectures", {architecture}},
              {"model_type", modelType},
              {"hidden_size", 64},
              {"num_hidden_layers", 2},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"vocab_size", 256},
              {"max_position_embeddings", 512},
              {"rms_norm_eps", 1e-6},
              {"tie_word_embeddings", false},
              {"torch_dtype", "bfloat16"}};
}

json deepseekConfig(bool v3, bool fp8) {
  json config = baseConfig(v3 ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM", v3 ? "deepseek_v3" : "deepseek_v2");
  config["num_hidden_layers"] = 3;
  config["num_key_value_heads"] = 4;
  config["kv_lora_rank"] = 32;
  config["q_lora_rank"] = v3 ? json(48) : json(nullptr);
  config["qk_nope_head_dim"] = 16;
  config["qk_rope_head_dim"] = 8;
  config["v_head_dim"] = 16;
  config["n_routed_experts"] = 8;
  config["n_shared_experts"] = v3 ? 1 : 2;
  config["num_experts_per_tok"] = v3 ? 4 : 2;
  config["moe_intermediate_size"] = 32;
  config["intermediate_size"] = 96;
  config["first_k_dense_replace"] = 1;
  config["moe_layer_freq"] = 1;
  config["n_group"] = v3 ? 4 : 1;
  config["topk_group"] = v3 ? 2 : 1;
  config["norm_topk_prob"] = v3;
  config["routed_scaling_factor"] = v3 ? 2.5 : 1.0;
  config["scoring_func"] = v3 ? "sigmoid" : "softmax";
  config["topk_method"] = v3 ? "noaux_tc" : "greedy";
  config["rope_theta"] = 10000.0;
  config["rope_scaling"] = {{"type", "yarn"},
                            {"factor", 40.0},
                            {"beta_fast", 32.0},
                            {"beta_slow", 1.0},
                            {"mscale", v3 ? 1.0 : 0.707},
                            {"mscale_all_dim", v3 ? 1.0 : 0.707},
                            {"original_max_position_embeddings", 4096}};
  if (v3) {
    config["num_nextn_predict_layers"] = 1;
    if (fp8) {
      // Dims past one 128-wide block, so block scales have several rows
      // and columns, some partial.
      config["hidden_size"] = 160;
      config["moe_intermediate_size"] = 136;
      config["intermediate_size"] = 272;
      config["quantization_config"] = {{"quant_method", "fp8"},
                                       {"fmt", "e4m3"},
                                       {"activation_scheme", "dynamic"},
                                       {"weight_block_size", {128, 128}}};
    }
  }
  return config;
}

bool makeDirectories(const std::string &path) {
  std::string partial;
  for (size_t i = 0; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      if (!partial.empty() && mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST)
        return false;
    }
    if (i < path.size())
      partial.push_back(path[i]);
  }
  return true;
}

/// Random values: norm weights near 1, everything else small around 0.
std::vector<float> randomValues(const TensorSpec &tensor, std::mt19937_64 &rng) {
  std::vector<float> values(static_cast<size_t>(numElements(tensor.shape)));
  std::normal_distribution<float> normal(0.0f, 0.05f);
  bool isNormWeight = roleGroup(tensor.role) == RoleGroup::Norms || tensor.role == TensorRole::QueryNorm ||
                      tensor.role == TensorRole::KeyNorm || tensor.role == TensorRole::QueryDownNorm ||
                      tensor.role == TensorRole::KvDownNorm;
  bool isBias = tensor.name.size() > 5 && tensor.name.compare(tensor.name.size() - 5, 5, ".bias") == 0;
  for (float &value : values)
    value = (isNormWeight && !isBias ? 1.0f : 0.0f) + normal(rng);
  return values;
}

/// Quantises a [rows, cols] matrix to E4M3 bytes and its block scales.
void quantizeFp8(const std::vector<float> &values, int64_t rows, int64_t cols, std::vector<uint8_t> &bytes,
                 std::vector<float> &scales) {
  int64_t scaleRows = (rows + kFp8BlockSize - 1) / kFp8BlockSize;
  int64_t scaleCols = (cols + kFp8BlockSize - 1) / kFp8BlockSize;
  scales.assign(static_cast<size_t>(scaleRows * scaleCols), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      float &scale = scales[(r / kFp8BlockSize) * scaleCols + c / kFp8BlockSize];
      scale = std::max(scale, std::fabs(values[r * cols + c]));
    }
  for (float &scale : scales)
    scale = scale > 0 ? scale / 448.0f : 1.0f;
  bytes.resize(values.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      float scale = scales[(r / kFp8BlockSize) * scaleCols + c / kFp8BlockSize];
      bytes[r * cols + c] = floatToFloat8E4M3(values[r * cols + c] / scale);
    }
}

} // namespace

uint8_t floatToFloat8E4M3(float value) {
  if (std::isnan(value))
    return 0x7F;
  uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  const float magnitude = std::min(std::fabs(value), 448.0f);
  // Codes 0x00..0x7E are the non-negative values in increasing order, and
  // their last bit is the mantissa's: the nearest code, ties to the even
  // one, is the value rounded to nearest-even on E4M3's grid (a DeepSeek-V3
  // layer has 11 billion weights to round).
  if (magnitude < 0.015625f) // below the smallest normal, 2^-6: steps of 2^-9
    return static_cast<uint8_t>(sign | static_cast<uint8_t>(std::nearbyint(magnitude * 512.0f)));
  uint32_t bits;
  std::memcpy(&bits, &magnitude, 4);
  const uint32_t exponent = ((bits >> 23) & 0xFF) - 127 + 7, mantissa = bits & 0x7FFFFF;
  uint32_t code = (exponent << 3) | (mantissa >> 20);
  const uint32_t half = 1u << 19, rest = mantissa & ((1u << 20) - 1);
  if (rest > half || (rest == half && (code & 1) != 0))
    ++code; // a carry into the exponent is the next code up
  return static_cast<uint8_t>(sign | std::min<uint32_t>(code, 0x7E));
}

std::optional<ModelFamily> parseFamilyName(std::string_view name) {
  for (ModelFamily family : {ModelFamily::Mixtral, ModelFamily::Qwen2Moe, ModelFamily::Qwen3Moe, ModelFamily::Olmoe,
                             ModelFamily::DeepseekV2, ModelFamily::DeepseekV3, ModelFamily::PhiMoe})
    if (familyName(family) == name)
      return family;
  return std::nullopt;
}

std::string syntheticConfigJson(ModelFamily family, bool fp8) {
  json config;
  switch (family) {
  case ModelFamily::Mixtral:
    config = baseConfig("MixtralForCausalLM", "mixtral");
    config["num_local_experts"] = 4;
    config["num_experts_per_tok"] = 2;
    config["intermediate_size"] = 48;
    config["rope_theta"] = 1e6;
    config["rms_norm_eps"] = 1e-5;
    break;
  case ModelFamily::PhiMoe:
    config = baseConfig("PhiMoEForCausalLM", "phimoe");
    config["num_local_experts"] = 4;
    config["num_experts_per_tok"] = 2;
    config["intermediate_size"] = 48;
    config["attention_bias"] = true;
    config["lm_head_bias"] = true;
    config["router_jitter_noise"] = 0.01;
    config["rope_theta"] = 10000.0;
    config["rope_scaling"] = {{"type", "longrope"},
                              {"short_factor", std::vector<double>(8, 1.0)},
                              {"long_factor", {1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0}},
                              {"short_mscale", 1.243163121016122},
                              {"long_mscale", 1.243163121016122},
                              {"original_max_position_embeddings", 128}};
    break;
  case ModelFamily::Qwen2Moe:
    config = baseConfig("Qwen2MoeForCausalLM", "qwen2_moe");
    config["num_hidden_layers"] = 3;
    config["num_experts"] = 6;
    config["num_experts_per_tok"] = 2;
    config["moe_intermediate_size"] = 24;
    config["shared_expert_intermediate_size"] = 64;
    config["intermediate_size"] = 96;
    config["mlp_only_layers"] = {1};
    config["decoder_sparse_step"] = 1;
    config["norm_topk_prob"] = false;
    break;
  case ModelFamily::Qwen3Moe:
    config = baseConfig("Qwen3MoeForCausalLM", "qwen3_moe");
    config["head_dim"] = 32; // explicit and != hidden / heads
    config["num_experts"] = 8;
    config["num_experts_per_tok"] = 2;
    config["moe_intermediate_size"] = 24;
    config["intermediate_size"] = 96;
    config["norm_topk_prob"] = true;
    config["attention_bias"] = false;
    break;
  case ModelFamily::Olmoe:
    config = baseConfig("OlmoeForCausalLM", "olmoe");
    config["num_key_value_heads"] = 4;
    config["num_experts"] = 8;
    config["num_experts_per_tok"] = 2;
    config["intermediate_size"] = 32;
    config["rms_norm_eps"] = 1e-5;
    config["clip_qkv"] = nullptr;
    break;
  case ModelFamily::DeepseekV2:
    config = deepseekConfig(false, false);
    break;
  case ModelFamily::DeepseekV3:
    config = deepseekConfig(true, fp8);
    break;
  }
  return config.dump(2) + "\n";
}

Status writeSyntheticCheckpoint(const std::string &directory, const SyntheticOptions &options) {
  if (options.fp8 && options.family != ModelFamily::DeepseekV3 && options.configText.empty())
    return Status::error("synthetic checkpoint: fp8 weights are only defined "
                         "for deepseek_v3");
  if (options.shards < 1)
    return Status::error("synthetic checkpoint: shards must be >= 1, got ", options.shards);
  if (!isFloatDType(options.dtype) || dtypeBytes(options.dtype) == 1 || options.dtype == DType::F64)
    return Status::error("synthetic checkpoint: dtype must be F32, F16 or BF16");
  if (!makeDirectories(directory))
    return Status::error(directory, ": cannot create directory: ", std::strerror(errno));

  std::string configText =
      options.configText.empty() ? syntheticConfigJson(options.family, options.fp8) : options.configText;
  json config = json::parse(configText, nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object())
    return Status::error("synthetic checkpoint: the config is not a JSON object");
  config["torch_dtype"] = options.dtype == DType::F32   ? "float32"
                          : options.dtype == DType::F16 ? "float16"
                                                        : "bfloat16";
  configText = config.dump(2) + "\n";
  Expected<ModelSpec> parsed = ModelSpec::fromConfigText(configText, "synthetic config");
  if (!parsed)
    return parsed.status();
  ModelSpec spec = parsed.take();
  for (LayerSpec &layer : spec.layers) {
    if (layer.mlp != MlpKind::Moe)
      continue;
    layer.expertLayout = options.expertLayout;
    if (options.expertLayout == ExpertLayout::Fused)
      layer.moePrefix = "mlp.";
  }

  // Each tensor's shard follows its layer, so shards hold whole layers, and
  // a shard is written as soon as the tensors reach the next one: memory
  // holds one shard (plus the first, which FP8 block scales of the last
  // layer wrap around to), so a checkpoint larger than RAM can be written.
  std::vector<std::unique_ptr<SafetensorsWriter>> writers(static_cast<size_t>(options.shards));
  for (std::unique_ptr<SafetensorsWriter> &writer : writers)
    writer = std::make_unique<SafetensorsWriter>();
  std::vector<bool> written(static_cast<size_t>(options.shards), false);
  std::vector<std::pair<std::string, int>> placement;
  // With fewer layers than shards (one DeepSeek-V3 layer is 15 GB), by
  // bytes instead: tensor i goes to the shard its first byte falls in, so
  // the shards are of about equal size and memory still holds about one.
  const std::vector<TensorSpec> tensors = spec.tensors();
  auto storedBytes = [&](const TensorSpec &tensor) {
    const int64_t count = numElements(tensor.shape);
    return count * (options.fp8 && tensor.isLinearWeight ? 1 : static_cast<int64_t>(dtypeBytes(options.dtype)));
  };
  int64_t allBytes = 0, bytesBefore = 0;
  for (const TensorSpec &tensor : tensors)
    allBytes += storedBytes(tensor);
  const bool byBytes = spec.numLayers < options.shards && allBytes > 0;
  auto shardOf = [&](const TensorSpec &tensor) {
    if (byBytes)
      return static_cast<int>(std::min<int64_t>(options.shards - 1, bytesBefore * options.shards / allBytes));
    int64_t layer = tensor.layer < 0 ? (tensor.role == TensorRole::Embedding ? 0 : spec.numLayers - 1) : tensor.layer;
    return static_cast<int>(layer * options.shards / spec.numLayers);
  };
  auto shardName = [&](int shard) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", shard + 1, options.shards);
    return std::string(name);
  };
  int64_t totalSize = 0;
  auto flush = [&](int shard) -> Status {
    std::unique_ptr<SafetensorsWriter> &writer = writers[static_cast<size_t>(shard)];
    writer->setMetadata("format", "pt");
    std::vector<uint8_t> bytes = writer->serialize();
    totalSize += static_cast<int64_t>(bytes.size());
    MOE_RETURN_IF_ERROR(writeFileAtomically(directory + "/" + shardName(shard), bytes));
    writer = std::make_unique<SafetensorsWriter>(); // its tensors go now, not at the end
    written[static_cast<size_t>(shard)] = true;
    return Status::success();
  };
  std::mt19937_64 rng(options.seed);
  auto add = [&](int shard, const std::string &name, DType dtype, const std::vector<int64_t> &shape,
                 std::vector<uint8_t> bytes) {
    placement.emplace_back(name, shard);
    return writers[static_cast<size_t>(shard)]->addTensor(name, dtype, shape, std::move(bytes));
  };
  for (const std::string &extra : options.extraTensors) {
    std::vector<float> values(4, 0.5f);
    placement.emplace_back(extra, 0);
    MOE_RETURN_IF_ERROR(writers[0]->addF32Tensor(extra, DType::F32, {4}, values));
  }
  for (const TensorSpec &tensor : tensors) {
    int shard = shardOf(tensor);
    bytesBefore += storedBytes(tensor);
    if (options.shards > 1)
      for (int earlier = options.fp8 ? 1 : 0; earlier < shard; ++earlier)
        if (!written[static_cast<size_t>(earlier)])
          MOE_RETURN_IF_ERROR(flush(earlier));
    std::vector<float> values = randomValues(tensor, rng);
    if (options.fp8 && tensor.isLinearWeight) {
      std::vector<uint8_t> bytes;
      std::vector<float> scales;
      quantizeFp8(values, tensor.shape[0], tensor.shape[1], bytes, scales);
      MOE_RETURN_IF_ERROR(add(shard, tensor.name, DType::F8E4M3, tensor.shape, std::move(bytes)));
      std::vector<uint8_t> scaleBytes(scales.size() * 4);
      std::memcpy(scaleBytes.data(), scales.data(), scaleBytes.size());
      MOE_RETURN_IF_ERROR(add((shard + 1) % options.shards, scaleInvName(tensor.name), DType::F32,
                              fp8ScaleShape(tensor.shape), std::move(scaleBytes)));
      continue;
    }
    // The correction bias is F32 in DeepSeek-V3 checkpoints.
    DType dtype = tensor.role == TensorRole::RouterCorrectionBias ? DType::F32 : options.dtype;
    placement.emplace_back(tensor.name, shard);
    MOE_RETURN_IF_ERROR(writers[static_cast<size_t>(shard)]->addF32Tensor(tensor.name, dtype, tensor.shape, values));
  }
  // A few multi-token-prediction tensors, which readers must ignore.
  for (int64_t j = 0; j < spec.numMtpLayers; ++j) {
    std::string prefix = concat("model.layers.", spec.numLayers + j, ".");
    std::vector<float> values(static_cast<size_t>(spec.hiddenSize * 2 * spec.hiddenSize), 0.01f);
    placement.emplace_back(prefix + "eh_proj.weight", options.shards - 1);
    MOE_RETURN_IF_ERROR(writers.back()->addF32Tensor(prefix + "eh_proj.weight", options.dtype,
                                                     {spec.hiddenSize, 2 * spec.hiddenSize}, values));
    std::vector<float> ones(static_cast<size_t>(spec.hiddenSize), 1.0f);
    placement.emplace_back(prefix + "enorm.weight", options.shards - 1);
    MOE_RETURN_IF_ERROR(writers.back()->addF32Tensor(prefix + "enorm.weight", options.dtype, {spec.hiddenSize}, ones));
  }

  MOE_RETURN_IF_ERROR(writeFileAtomically(
      directory + "/config.json",
      std::span<const uint8_t>(reinterpret_cast<const uint8_t *>(configText.data()), configText.size())));
  if (options.shards == 1) {
    writers[0]->setMetadata("format", "pt");
    return writers[0]->write(directory + "/model.safetensors");
  }
  json weightMap = json::object();
  for (int shard = 0; shard < options.shards; ++shard) {
    if (!written[static_cast<size_t>(shard)])
      MOE_RETURN_IF_ERROR(flush(shard));
    for (const auto &[tensor, tensorShard] : placement)
      if (tensorShard == shard)
        weightMap[tensor] = shardName(shard);
  }
  json index = {{"metadata", {{"total_size", totalSize}}}, {"weight_map", weightMap}};
  std::string indexText = index.dump(2) + "\n";
  return writeFileAtomically(
      directory + "/model.safetensors.index.json",
      std::span<const uint8_t>(reinterpret_cast<const uint8_t *>(indexText.data()), indexText.size()));
}

} // namespace moe
