//===- ModelConfig.cpp - config.json to ModelSpec, one adapter a family ---===//
//
// Part of moec. Each family adapter reads the keys its transformers config
// class defines, with the same defaults, and fills the shared ModelSpec.
// Structural sizes (hidden size, layer and head counts, vocabulary, expert
// counts and widths) are required: a config without them is broken.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/ModelSpec.h"
#include "moe/Support/File.h"

#include <nlohmann/json.hpp>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <functional>
#include <set>
#include <sstream>

namespace moe {

using json = nlohmann::json;

namespace {

/// Bounds far above any released model, so that a corrupt config fails with
/// a message instead of exhausting memory or overflowing a size.
constexpr int64_t kMaxDimension = int64_t(1) << 22;
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxVocabulary = int64_t(1) << 24;
constexpr int64_t kMaxHeads = 4096;
constexpr int64_t kMaxExperts = 4096;
constexpr int64_t kMaxRoutedExpertsInModel = 262144;

/// Typed access to config keys; remembers the first error.
class ConfigReader {
public:
  ConfigReader(const json &root, std::string source) : root(root), source(std::move(source)) {}

  /// Present and not null.
  bool has(const char *key) const {
    auto it = root.find(key);
    return it != root.end() && !it->is_null();
  }
  const json *get(const char *key) const {
    auto it = root.find(key);
    return it == root.end() || it->is_null() ? nullptr : &*it;
  }

  int64_t requireInt(const char *key) {
    if (!has(key)) {
      fail("missing required key '", key, "'");
      return 0;
    }
    return intValue(key, *get(key));
  }
  int64_t optionalInt(const char *key, int64_t fallback) { return has(key) ? intValue(key, *get(key)) : fallback; }
  double optionalDouble(const char *key, double fallback) {
    if (!has(key))
      return fallback;
    const json &value = *get(key);
    if (!value.is_number()) {
      fail("key '", key, "' must be a number, got ", value.dump());
      return fallback;
    }
    return value.get<double>();
  }
  bool optionalBool(const char *key, bool fallback) {
    if (!has(key))
      return fallback;
    const json &value = *get(key);
    if (!value.is_boolean()) {
      fail("key '", key, "' must be true or false, got ", value.dump());
      return fallback;
    }
    return value.get<bool>();
  }
  std::string optionalString(const char *key, std::string fallback) {
    if (!has(key))
      return fallback;
    const json &value = *get(key);
    if (!value.is_string()) {
      fail("key '", key, "' must be a string, got ", value.dump());
      return fallback;
    }
    return value.get<std::string>();
  }
  std::vector<int64_t> optionalIntList(const char *key) {
    std::vector<int64_t> values;
    if (!has(key))
      return values;
    const json &value = *get(key);
    if (!value.is_array()) {
      fail("key '", key, "' must be a list of integers, got ", value.dump());
      return values;
    }
    for (const json &item : value) {
      if (!item.is_number_integer()) {
        fail("key '", key, "' must be a list of integers, got ", value.dump());
        return {};
      }
      values.push_back(item.get<int64_t>());
    }
    return values;
  }
  /// The first of `keys` present (older and newer transformers spell some
  /// keys differently), or the first when none is.
  const char *firstPresent(std::initializer_list<const char *> keys) const {
    for (const char *key : keys)
      if (has(key))
        return key;
    return *keys.begin();
  }
  /// A positive integer no larger than `maximum`: sizes and counts.
  int64_t requirePositive(const char *key, int64_t maximum = kMaxDimension) {
    int64_t value = requireInt(key);
    if (status.ok() && (value <= 0 || value > maximum))
      fail("key '", key, "' must be between 1 and ", maximum, ", got ", value);
    return value;
  }

  template <typename... Args> void fail(const Args &...args) {
    if (status.ok())
      status = Status::error(source, ": ", args...);
  }
  const Status &result() const { return status; }
  const std::string &name() const { return source; }

private:
  int64_t intValue(const char *key, const json &value) {
    if (value.is_number_integer())
      return value.get<int64_t>();
    // Some exporters write integral floats (e.g. 4096.0).
    if (value.is_number_float() && std::floor(value.get<double>()) == value.get<double>() &&
        std::fabs(value.get<double>()) < 9e15)
      return static_cast<int64_t>(value.get<double>());
    fail("key '", key, "' must be an integer, got ", value.dump());
    return 0;
  }

  const json &root;
  std::string source;
  Status status;
};

/// Reads RoPE in the three forms transformers writes: top-level rope_theta
/// plus rope_scaling, or a v5 rope_parameters object.
void readRope(ConfigReader &config, RopeSpec &rope, double defaultTheta) {
  rope.theta = config.optionalDouble("rope_theta", defaultTheta);
  const json *scaling = config.get("rope_scaling");
  if (const json *parameters = config.get("rope_parameters")) {
    if (!parameters->is_object()) {
      config.fail("key 'rope_parameters' must be an object");
      return;
    }
    if (parameters->contains("rope_theta") && (*parameters)["rope_theta"].is_number())
      rope.theta = (*parameters)["rope_theta"].get<double>();
    scaling = parameters;
  }
  if (!scaling)
    return;
  if (!scaling->is_object()) {
    config.fail("key 'rope_scaling' must be an object or null");
    return;
  }
  std::string type;
  for (const char *key : {"rope_type", "type"})
    if (scaling->contains(key) && (*scaling)[key].is_string()) {
      type = (*scaling)[key].get<std::string>();
      break;
    }
  auto number = [&](const char *key, double fallback) {
    auto it = scaling->find(key);
    if (it == scaling->end() || it->is_null())
      return fallback;
    if (!it->is_number()) {
      config.fail("rope scaling key '", key, "' must be a number");
      return fallback;
    }
    return it->get<double>();
  };
  auto factors = [&](const char *key) {
    std::vector<double> values;
    auto it = scaling->find(key);
    if (it == scaling->end() || !it->is_array()) {
      config.fail("longrope scaling needs a list '", key, "'");
      return values;
    }
    for (const json &item : *it) {
      if (!item.is_number()) {
        config.fail("longrope '", key, "' must hold numbers");
        return std::vector<double>();
      }
      values.push_back(item.get<double>());
    }
    return values;
  };
  rope.originalMaxPositions =
      static_cast<int64_t>(number("original_max_position_embeddings",
                                  static_cast<double>(config.optionalInt("original_max_position_embeddings", 0))));
  if (type.empty() || type == "default") {
    rope.scaling = RopeScalingKind::None;
  } else if (type == "linear") {
    rope.scaling = RopeScalingKind::Linear;
    rope.factor = number("factor", 1.0);
  } else if (type == "dynamic") {
    rope.scaling = RopeScalingKind::Dynamic;
    rope.factor = number("factor", 1.0);
  } else if (type == "yarn") {
    rope.scaling = RopeScalingKind::Yarn;
    rope.factor = number("factor", 1.0);
    rope.betaFast = number("beta_fast", 32.0);
    rope.betaSlow = number("beta_slow", 1.0);
    rope.mscale = number("mscale", 1.0);
    rope.mscaleAllDim = number("mscale_all_dim", 0.0);
    auto truncate = scaling->find("truncate");
    if (truncate != scaling->end() && truncate->is_boolean())
      rope.truncate = truncate->get<bool>();
  } else if (type == "longrope" || type == "su") {
    rope.scaling = RopeScalingKind::LongRope;
    rope.shortFactor = factors("short_factor");
    rope.longFactor = factors("long_factor");
    rope.shortMscale = number("short_mscale", 1.0);
    rope.longMscale = number("long_mscale", 1.0);
  } else {
    config.fail("unsupported rope scaling type '", type, "'; supported: default, linear, dynamic, yarn, longrope");
  }
  if (rope.scaling == RopeScalingKind::Yarn && rope.originalMaxPositions <= 0)
    config.fail("yarn rope scaling needs original_max_position_embeddings");
  if ((rope.scaling == RopeScalingKind::Yarn || rope.scaling == RopeScalingKind::Linear ||
       rope.scaling == RopeScalingKind::Dynamic) &&
      !(rope.factor > 0))
    config.fail("rope scaling factor must be positive");
}

/// YaRN's attention magnitude correction (DeepSeek's yarn_get_mscale).
double yarnMscale(double factor, double mscale) { return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0; }

DType readConfigDType(ConfigReader &config) {
  for (const char *key : {"torch_dtype", "dtype"}) {
    std::string name = config.optionalString(key, "");
    if (name.empty())
      continue;
    if (std::optional<DType> dtype = parseTorchDType(name))
      return *dtype;
    config.fail("key '", key, "' names unsupported dtype '", name, "'; expected bfloat16, float16 or float32");
  }
  return DType::BF16;
}

/// Fields every family shares.
void readCommon(ConfigReader &config, ModelSpec &spec) {
  spec.hiddenSize = config.requirePositive("hidden_size", int64_t(1) << 20);
  spec.numLayers = config.requirePositive("num_hidden_layers", kMaxLayers);
  spec.vocabSize = config.requirePositive("vocab_size", kMaxVocabulary);
  spec.maxPositions = config.optionalInt("max_position_embeddings", 4096);
  spec.tieWordEmbeddings = config.optionalBool("tie_word_embeddings", false);
  spec.configDType = readConfigDType(config);
  // Every family's experts and MLPs are SwiGLU; the engine computes SiLU and
  // nothing else, so another activation would run silently wrong.
  const std::string activation = config.optionalString("hidden_act", "silu");
  if (activation != "silu" && activation != "swish")
    config.fail("key 'hidden_act' is '", activation, "'; moec runs SwiGLU MLPs: expected \"silu\"");
  AttentionSpec &attention = spec.attention;
  attention.numHeads = config.requirePositive("num_attention_heads", kMaxHeads);
  attention.numKeyValueHeads = config.optionalInt("num_key_value_heads", attention.numHeads);
  if (config.result().ok() && (attention.numKeyValueHeads <= 0 || attention.numHeads % attention.numKeyValueHeads != 0))
    config.fail("num_attention_heads (", attention.numHeads, ") must be a multiple of num_key_value_heads (",
                attention.numKeyValueHeads, ")");
}

/// Grouped-query attention with an optional explicit head_dim.
void readGroupedQueryAttention(ConfigReader &config, ModelSpec &spec) {
  AttentionSpec &attention = spec.attention;
  attention.kind = AttentionKind::GroupedQuery;
  int64_t defaultHeadDim = attention.numHeads > 0 ? spec.hiddenSize / attention.numHeads : 0;
  attention.headDim = config.optionalInt("head_dim", defaultHeadDim);
  if (config.result().ok() && (attention.headDim <= 0 || attention.headDim % 2))
    config.fail("head dimension ", attention.headDim,
                " must be positive and even (hidden_size / num_attention_heads "
                "or head_dim)");
  attention.valueHeadDim = attention.headDim;
  attention.softmaxScale = 1.0 / std::sqrt(static_cast<double>(attention.headDim));
  spec.rope.rotaryDim = attention.headDim;
}

void fillLayers(const ConfigReader &config, ModelSpec &spec, const std::function<bool(int64_t)> &isMoe,
                int64_t denseIntermediate, int64_t numExperts, int64_t expertIntermediate, SharedExpertSpec shared,
                const std::string &moePrefix) {
  spec.layers.clear();
  // After an error the layer count may be anything; build nothing.
  if (!config.result().ok())
    return;
  for (int64_t i = 0; i < spec.numLayers; ++i) {
    LayerSpec layer;
    layer.index = i;
    layer.mlp = isMoe(i) ? MlpKind::Moe : MlpKind::Dense;
    layer.denseIntermediateSize = denseIntermediate;
    if (layer.mlp == MlpKind::Moe) {
      layer.numExperts = numExperts;
      layer.expertIntermediateSize = expertIntermediate;
      layer.shared = shared;
      layer.moePrefix = moePrefix;
    }
    spec.layers.push_back(layer);
  }
}

void checkTopK(ConfigReader &config, const RouterSpec &router, int64_t experts) {
  if (config.result().ok() && (router.topK < 1 || router.topK > experts))
    config.fail("num_experts_per_tok (", router.topK, ") must be between 1 and the number of experts (", experts, ")");
}

Status parseMixtral(ConfigReader &config, ModelSpec &spec) {
  readCommon(config, spec);
  readGroupedQueryAttention(config, spec);
  readRope(config, spec.rope, 1e6);
  spec.normEps = config.optionalDouble("rms_norm_eps", 1e-5);
  int64_t experts = config.requirePositive("num_local_experts");
  int64_t width = config.requirePositive("intermediate_size");
  spec.router.topK = config.requireInt("num_experts_per_tok");
  spec.router.normalizeTopK = true;
  checkTopK(config, spec.router, experts);
  fillLayers(
      config, spec, [](int64_t) { return true; }, 0, experts, width, {}, "block_sparse_moe.");
  return config.result();
}

Status parsePhiMoe(ConfigReader &config, ModelSpec &spec) {
  MOE_RETURN_IF_ERROR(parseMixtral(config, spec));
  spec.normKind = NormKind::LayerNorm;
  spec.attention.qkvBias = spec.attention.outputBias = config.optionalBool("attention_bias", false);
  spec.lmHeadBias = config.optionalBool("lm_head_bias", false);
  readRope(config, spec.rope, 1e4);
  spec.router.scoring = RouterScoring::SparseMixer;
  spec.router.normalizeTopK = false;
  spec.router.jitterEps = config.optionalDouble("router_jitter_noise", 0.01);
  if (config.result().ok() && spec.router.topK != 2)
    config.fail("PhiMoE sparsemixer routing selects exactly 2 experts; "
                "num_experts_per_tok is ",
                spec.router.topK);
  const RopeSpec &rope = spec.rope;
  if (config.result().ok() && rope.scaling == RopeScalingKind::LongRope &&
      (static_cast<int64_t>(rope.shortFactor.size()) != rope.rotaryDim / 2 ||
       static_cast<int64_t>(rope.longFactor.size()) != rope.rotaryDim / 2))
    config.fail("longrope short_factor/long_factor must have head_dim/2 = ", rope.rotaryDim / 2, " entries, got ",
                rope.shortFactor.size(), "/", rope.longFactor.size());
  return config.result();
}

/// Qwen2-MoE (with a gated shared expert) and Qwen3-MoE (per-head qk-norm).
Status parseQwenMoe(ConfigReader &config, ModelSpec &spec, bool qwen3) {
  readCommon(config, spec);
  readGroupedQueryAttention(config, spec);
  readRope(config, spec.rope, 1e4);
  spec.normEps = config.optionalDouble("rms_norm_eps", 1e-6);
  if (qwen3) {
    spec.attention.qkNorm = QkNormKind::PerHead;
    spec.attention.qkvBias = spec.attention.outputBias = config.optionalBool("attention_bias", false);
  } else {
    // transformers v4 hard-codes the q/k/v bias; v5 writes qkv_bias.
    spec.attention.qkvBias = config.optionalBool("qkv_bias", true);
  }
  // transformers v5 writes num_local_experts for Qwen3-MoE.
  int64_t experts = config.requirePositive(config.firstPresent({"num_experts", "num_local_experts"}));
  int64_t width = config.requirePositive("moe_intermediate_size");
  int64_t denseWidth = config.optionalInt("intermediate_size", 0);
  int64_t sparseStep = config.optionalInt("decoder_sparse_step", 1);
  std::vector<int64_t> mlpOnly = config.optionalIntList("mlp_only_layers");
  spec.router.topK = config.requireInt("num_experts_per_tok");
  spec.router.normalizeTopK = config.optionalBool("norm_topk_prob", qwen3);
  SharedExpertSpec shared;
  if (!qwen3) {
    shared.intermediateSize = config.optionalInt("shared_expert_intermediate_size", 0);
    shared.gated = shared.intermediateSize > 0;
  }
  checkTopK(config, spec.router, experts);
  if (config.result().ok() && sparseStep <= 0)
    config.fail("decoder_sparse_step must be positive, got ", sparseStep);
  std::set<int64_t> denseLayers(mlpOnly.begin(), mlpOnly.end());
  auto isMoe = [&](int64_t i) { return !denseLayers.count(i) && (i + 1) % sparseStep == 0; };
  for (int64_t i = 0; i < spec.numLayers && config.result().ok(); ++i)
    if (!isMoe(i) && denseWidth <= 0)
      config.fail("layer ", i,
                  " is dense (mlp_only_layers/decoder_sparse_step) "
                  "but intermediate_size is missing");
  fillLayers(config, spec, isMoe, denseWidth, experts, width, shared, "mlp.");
  return config.result();
}

Status parseOlmoe(ConfigReader &config, ModelSpec &spec) {
  readCommon(config, spec);
  readGroupedQueryAttention(config, spec);
  readRope(config, spec.rope, 1e4);
  spec.normEps = config.optionalDouble("rms_norm_eps", 1e-5);
  spec.attention.qkNorm = QkNormKind::FullWidth;
  spec.attention.qkvBias = spec.attention.outputBias = config.optionalBool("attention_bias", false);
  spec.attention.clipQkv = config.optionalDouble("clip_qkv", 0.0);
  int64_t experts = config.requirePositive(config.firstPresent({"num_experts", "num_local_experts"}));
  int64_t width = config.requirePositive("intermediate_size");
  spec.router.topK = config.requireInt("num_experts_per_tok");
  spec.router.normalizeTopK = config.optionalBool("norm_topk_prob", false);
  checkTopK(config, spec.router, experts);
  fillLayers(
      config, spec, [](int64_t) { return true; }, 0, experts, width, {}, "mlp.");
  return config.result();
}

/// DeepSeek-V2 / V2-Lite (softmax, greedy or group-max routing) and V3
/// (sigmoid with correction bias and group top-2-sum routing, FP8).
Status parseDeepseek(ConfigReader &config, ModelSpec &spec, bool v3) {
  readCommon(config, spec);
  readRope(config, spec.rope, 1e4);
  spec.normEps = config.optionalDouble("rms_norm_eps", 1e-6);
  AttentionSpec &attention = spec.attention;
  attention.kind = AttentionKind::MultiHeadLatent;
  attention.numKeyValueHeads = attention.numHeads;
  attention.queryLoraRank = config.optionalInt("q_lora_rank", 0);
  attention.kvLoraRank = config.requirePositive("kv_lora_rank");
  attention.qkNopeHeadDim = config.requirePositive("qk_nope_head_dim");
  attention.qkRopeHeadDim = config.requirePositive("qk_rope_head_dim");
  attention.valueHeadDim = config.requirePositive("v_head_dim");
  attention.headDim = attention.qkNopeHeadDim + attention.qkRopeHeadDim;
  attention.qkvBias = attention.outputBias = config.optionalBool("attention_bias", false);
  if (config.result().ok() && attention.qkRopeHeadDim % 2)
    config.fail("qk_rope_head_dim must be even, got ", attention.qkRopeHeadDim);
  spec.rope.layout = config.optionalBool("rope_interleave", true) ? RopeLayout::Interleaved : RopeLayout::Half;
  spec.rope.rotaryDim = attention.qkRopeHeadDim;
  attention.softmaxScale = 1.0 / std::sqrt(static_cast<double>(attention.headDim));
  if (spec.rope.scaling == RopeScalingKind::Yarn && spec.rope.mscaleAllDim != 0) {
    double m = yarnMscale(spec.rope.factor, spec.rope.mscaleAllDim);
    attention.softmaxScale *= m * m;
  }

  int64_t experts = config.requirePositive("n_routed_experts");
  int64_t width = config.requirePositive("moe_intermediate_size");
  int64_t denseWidth = config.optionalInt("intermediate_size", 0);
  int64_t firstDense = config.optionalInt("first_k_dense_replace", 0);
  int64_t layerFrequency = config.optionalInt("moe_layer_freq", 1);
  int64_t sharedCount = config.optionalInt("n_shared_experts", 0);
  RouterSpec &router = spec.router;
  router.topK = config.requireInt("num_experts_per_tok");
  router.normalizeTopK = config.optionalBool("norm_topk_prob", false);
  router.scalingFactor = config.optionalDouble("routed_scaling_factor", 1.0);
  router.numGroups = config.optionalInt("n_group", 1);
  router.topKGroups = config.optionalInt("topk_group", 1);
  std::string scoring = config.optionalString("scoring_func", v3 ? "sigmoid" : "softmax");
  std::string method = config.optionalString("topk_method", v3 ? "noaux_tc" : "greedy");
  if (scoring == "softmax")
    router.scoring = RouterScoring::Softmax;
  else if (scoring == "sigmoid")
    router.scoring = RouterScoring::Sigmoid;
  else
    config.fail("unsupported scoring_func '", scoring, "'; expected softmax or sigmoid");
  if (method == "greedy") {
    router.selection = ExpertSelection::TopK;
  } else if (method == "group_limited_greedy") {
    router.selection = ExpertSelection::GroupLimitedMax;
  } else if (method == "noaux_tc") {
    router.selection = ExpertSelection::GroupLimitedTopTwoSum;
    router.correctionBias = true;
  } else {
    config.fail("unsupported topk_method '", method, "'; expected greedy, group_limited_greedy or noaux_tc");
  }
  checkTopK(config, router, experts);
  if (config.result().ok() && router.selection != ExpertSelection::TopK &&
      (router.numGroups < 1 || experts % router.numGroups != 0 || router.topKGroups < 1 ||
       router.topKGroups > router.numGroups || router.topK > router.topKGroups * (experts / router.numGroups)))
    config.fail("group-limited routing needs n_group dividing n_routed_experts (", experts,
                ") and 1 <= topk_group <= n_group, with enough experts "
                "in topk_group groups for num_experts_per_tok; got n_group ",
                router.numGroups, ", topk_group ", router.topKGroups);
  if (config.result().ok() && (firstDense < 0 || layerFrequency <= 0 || sharedCount < 0))
    config.fail("first_k_dense_replace, moe_layer_freq and n_shared_experts must "
                "be non-negative (moe_layer_freq positive)");
  if (config.result().ok() && firstDense > 0 && denseWidth <= 0)
    config.fail("first_k_dense_replace is ", firstDense, " but intermediate_size (dense MLP width) is missing");

  if (const json *quantization = config.get("quantization_config")) {
    std::string quantMethod = quantization->is_object() && quantization->contains("quant_method") &&
                                      (*quantization)["quant_method"].is_string()
                                  ? (*quantization)["quant_method"].get<std::string>()
                                  : "";
    if (quantMethod == "fp8")
      spec.fp8BlockScaled = true;
    else
      config.fail("unsupported quantization_config quant_method '", quantMethod,
                  "'; supported: fp8 (128x128 block scales)");
  }
  spec.numMtpLayers = config.optionalInt("num_nextn_predict_layers", 0);

  SharedExpertSpec shared;
  shared.intermediateSize = sharedCount * width;
  fillLayers(
      config, spec, [&](int64_t i) { return i >= firstDense && i % layerFrequency == 0; }, denseWidth, experts, width,
      shared, "mlp.");
  return config.result();
}

/// Checks the sizes every adapter filled in against the supported bounds;
/// the adapters check what is specific to their family.
Status checkSizes(const ModelSpec &spec, const std::string &source) {
  auto outside = [&](const char *what, int64_t value, int64_t low, int64_t high) {
    return Status::error(source, ": ", what, " = ", value, " is outside the supported range [", low, ", ", high, "]");
  };
  const AttentionSpec &a = spec.attention;
  struct Bound {
    const char *what;
    int64_t value, low, high;
  };
  for (const Bound &bound : {
           Bound{"head dimension", a.headDim, 2, 4096},
           Bound{"value head dimension", a.valueHeadDim, 1, 4096},
           Bound{"num_key_value_heads", a.numKeyValueHeads, 1, kMaxHeads},
           Bound{"q_lora_rank", a.queryLoraRank, 0, int64_t(1) << 16},
           Bound{"kv_lora_rank", a.kvLoraRank, 0, int64_t(1) << 16},
           Bound{"max_position_embeddings", spec.maxPositions, 1, int64_t(1) << 32},
           Bound{"num_nextn_predict_layers", spec.numMtpLayers, 0, 16},
       })
    if (bound.value < bound.low || bound.value > bound.high)
      return outside(bound.what, bound.value, bound.low, bound.high);
  // Values that are numbers but make every result NaN or infinite.
  struct PositiveReal {
    const char *what;
    double value;
  };
  for (const PositiveReal &real : {
           PositiveReal{"rms_norm_eps (norm epsilon)", spec.normEps},
           PositiveReal{"rope_theta", spec.rope.theta},
           PositiveReal{"rope scaling factor", spec.rope.factor},
           PositiveReal{"attention softmax scale", a.softmaxScale},
       })
    if (!(real.value > 0) || !std::isfinite(real.value))
      return Status::error(source, ": ", real.what, " = ", real.value, " must be a positive finite number");
  if (!(spec.normEps < 1))
    return Status::error(source, ": rms_norm_eps (norm epsilon) = ", spec.normEps, " must be below 1");
  if (!std::isfinite(spec.router.scalingFactor) || !(spec.router.scalingFactor > 0))
    return Status::error(source, ": routed_scaling_factor = ", spec.router.scalingFactor,
                         " must be a positive finite number");
  if (!std::isfinite(spec.router.jitterEps) || spec.router.jitterEps < 0)
    return Status::error(source, ": router_jitter_noise = ", spec.router.jitterEps, " must be a finite number >= 0");
  if (!std::isfinite(a.clipQkv) || a.clipQkv < 0)
    return Status::error(source, ": clip_qkv = ", a.clipQkv, " must be a finite number >= 0");
  for (const std::vector<double> *factors : {&spec.rope.shortFactor, &spec.rope.longFactor})
    for (double factor : *factors)
      if (!(factor > 0) || !std::isfinite(factor))
        return Status::error(source, ": longrope factor ", factor, " must be a positive finite number");
  int64_t routedExperts = 0;
  for (const LayerSpec &layer : spec.layers) {
    if (layer.mlp == MlpKind::Dense) {
      if (layer.denseIntermediateSize < 1 || layer.denseIntermediateSize > kMaxDimension)
        return outside("intermediate_size (dense layers)", layer.denseIntermediateSize, 1, kMaxDimension);
      continue;
    }
    if (layer.numExperts < 1 || layer.numExperts > kMaxExperts)
      return outside("number of routed experts", layer.numExperts, 1, kMaxExperts);
    if (layer.expertIntermediateSize < 1 || layer.expertIntermediateSize > kMaxDimension)
      return outside("expert intermediate size", layer.expertIntermediateSize, 1, kMaxDimension);
    if (layer.shared.intermediateSize < 0 || layer.shared.intermediateSize > kMaxDimension)
      return outside("shared expert intermediate size", layer.shared.intermediateSize, 0, kMaxDimension);
    routedExperts += layer.numExperts;
  }
  if (routedExperts > kMaxRoutedExpertsInModel)
    return outside("routed experts in all layers", routedExperts, 0, kMaxRoutedExpertsInModel);
  return Status::success();
}

struct ArchitectureEntry {
  std::string_view architecture;
  std::string_view modelType;
  ModelFamily family;
  std::function<Status(ConfigReader &, ModelSpec &)> parse;
};

const std::vector<ArchitectureEntry> &architectureTable() {
  static const std::vector<ArchitectureEntry> table = {
      {"MixtralForCausalLM", "mixtral", ModelFamily::Mixtral, parseMixtral},
      {"Qwen2MoeForCausalLM", "qwen2_moe", ModelFamily::Qwen2Moe,
       [](ConfigReader &c, ModelSpec &s) { return parseQwenMoe(c, s, false); }},
      {"Qwen3MoeForCausalLM", "qwen3_moe", ModelFamily::Qwen3Moe,
       [](ConfigReader &c, ModelSpec &s) { return parseQwenMoe(c, s, true); }},
      {"OlmoeForCausalLM", "olmoe", ModelFamily::Olmoe, parseOlmoe},
      {"DeepseekV2ForCausalLM", "deepseek_v2", ModelFamily::DeepseekV2,
       [](ConfigReader &c, ModelSpec &s) { return parseDeepseek(c, s, false); }},
      {"DeepseekV3ForCausalLM", "deepseek_v3", ModelFamily::DeepseekV3,
       [](ConfigReader &c, ModelSpec &s) { return parseDeepseek(c, s, true); }},
      {"PhiMoEForCausalLM", "phimoe", ModelFamily::PhiMoe, parsePhiMoe},
      {"PhimoeForCausalLM", "phimoe", ModelFamily::PhiMoe, parsePhiMoe},
  };
  return table;
}

} // namespace

std::string supportedArchitectureList() {
  std::string list;
  for (const ArchitectureEntry &entry : architectureTable()) {
    if (!list.empty())
      list += ", ";
    list += entry.architecture;
  }
  return list;
}

Expected<ModelSpec> ModelSpec::fromConfigText(std::string_view text, const std::string &source) {
  json root = json::parse(text.begin(), text.end(), nullptr,
                          /*allow_exceptions=*/false);
  if (root.is_discarded())
    return Status::error(source, ": not valid JSON");
  if (!root.is_object())
    return Status::error(source, ": expected a JSON object");
  ConfigReader config(root, source);

  // Dispatch on architectures[0]; fall back to model_type when absent.
  std::string architecture;
  if (const json *architectures = config.get("architectures")) {
    if (!architectures->is_array() || architectures->empty() || !(*architectures)[0].is_string())
      return Status::error(source, ": key 'architectures' must be a non-empty "
                                   "list of class names");
    architecture = (*architectures)[0].get<std::string>();
  }
  std::string modelType = config.optionalString("model_type", "");
  MOE_RETURN_IF_ERROR(config.result());
  if (architecture.empty() && modelType.empty())
    return Status::error(source,
                         ": missing required key 'architectures' (or "
                         "'model_type'); supported: ",
                         supportedArchitectureList());
  const ArchitectureEntry *match = nullptr;
  for (const ArchitectureEntry &entry : architectureTable())
    if (architecture.empty() ? entry.modelType == modelType : entry.architecture == architecture) {
      match = &entry;
      break;
    }
  if (!match)
    return Status::error(source, ": unsupported architecture ", architecture.empty() ? modelType : architecture,
                         "; supported: ", supportedArchitectureList());

  ModelSpec spec;
  spec.family = match->family;
  spec.architecture = std::string(match->architecture);
  spec.modelType = modelType.empty() ? std::string(match->modelType) : modelType;
  MOE_RETURN_IF_ERROR(match->parse(config, spec));
  MOE_RETURN_IF_ERROR(checkSizes(spec, source));
  return spec;
}

Expected<ModelSpec> ModelSpec::fromConfigFile(const std::string &path) {
  Expected<std::string> text = readWholeFile(path);
  if (!text)
    return text.status();
  return fromConfigText(*text, path);
}

} // namespace moe
