//===- ModelSpecTest.cpp - Config parsing, layouts and validation ---------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/ModelSpec.h"
#include "moe/Frontend/Checkpoint.h"
#include "moe/Frontend/ModelSummary.h"
#include "moe/Frontend/SyntheticCheckpoint.h"

#include "TestSupport.h"

#include <nlohmann/json.hpp>

#include <cmath>

using namespace moe;
using namespace moe::testing;
using json = nlohmann::json;

namespace {

const std::vector<ModelFamily> allFamilies = {ModelFamily::Mixtral, ModelFamily::Qwen2Moe,   ModelFamily::Qwen3Moe,
                                              ModelFamily::Olmoe,   ModelFamily::DeepseekV2, ModelFamily::DeepseekV3,
                                              ModelFamily::PhiMoe};

/// Writes a synthetic checkpoint, then lets `edit` change its config.json.
void writeWithConfig(const std::string &dir, SyntheticOptions options, const std::function<void(json &)> &edit) {
  ASSERT_TRUE(writeSyntheticCheckpoint(dir, options).ok());
  json config = json::parse(readFile(dir + "/config.json"));
  edit(config);
  writeFile(dir + "/config.json", config.dump(2));
}

/// Opens, parses and binds; returns the bind result.
Expected<CheckpointReport> openAndBind(const std::string &dir, ModelSpec *specOut = nullptr) {
  auto spec = ModelSpec::fromConfigFile(dir + "/config.json");
  if (!spec)
    return spec.status();
  auto checkpoint = Checkpoint::open(dir);
  if (!checkpoint)
    return checkpoint.status();
  auto report = bindCheckpoint(*spec, **checkpoint);
  if (specOut)
    *specOut = *spec;
  return report;
}

/// Rewrites the single-file checkpoint in `dir` tensor by tensor: `edit`
/// may change a tensor's dtype label or shape (same byte count) or return
/// false to drop it.
using TensorEdit = std::function<bool(const std::string &name, DType &dtype, std::vector<int64_t> &shape)>;
void rewriteCheckpoint(const std::string &dir, const TensorEdit &edit) {
  SafetensorsWriter writer;
  {
    auto checkpoint = Checkpoint::open(dir);
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status().message();
    for (const std::string &name : (*checkpoint)->tensorNames()) {
      const TensorLocation *location = (*checkpoint)->find(name);
      DType dtype = location->info->dtype;
      std::vector<int64_t> shape = location->info->shape;
      if (!edit(name, dtype, shape))
        continue;
      std::span<const uint8_t> bytes = location->bytes();
      ASSERT_TRUE(writer.addTensor(name, dtype, shape, std::vector<uint8_t>(bytes.begin(), bytes.end())).ok());
    }
  }
  ASSERT_TRUE(writer.write(dir + "/model.safetensors").ok());
}

std::string familyTestName(ModelFamily family) { return std::string(familyName(family)); }

} // namespace

TEST(ModelSpec, RoleTableMatchesEnumOrder) {
  // roleInfo() indexes its table by enum value.
  EXPECT_EQ(tensorRoleName(TensorRole::Embedding), "embedding");
  EXPECT_EQ(tensorRoleName(TensorRole::SharedExpertGate), "shared_expert_gate");
  EXPECT_EQ(tensorRoleName(TensorRole::KvUpProj), "kv_b_proj");
  EXPECT_EQ(roleGroup(TensorRole::ExpertDownFused), RoleGroup::RoutedExperts);
  EXPECT_EQ(roleGroup(TensorRole::RouterCorrectionBias), RoleGroup::Router);
}

struct LayoutCase {
  ModelFamily family;
  ExpertLayout layout;
  int shards;
};

void PrintTo(const LayoutCase &c, std::ostream *os) {
  *os << familyName(c.family) << " " << expertLayoutName(c.layout) << " " << c.shards;
}

class SyntheticFamilies : public ::testing::TestWithParam<LayoutCase> {};

TEST_P(SyntheticFamilies, BindWithoutWarningsAndCountEveryTensor) {
  const LayoutCase &c = GetParam();
  TempDir dir;
  SyntheticOptions options;
  options.family = c.family;
  options.expertLayout = c.layout;
  options.shards = c.shards;
  ASSERT_TRUE(writeSyntheticCheckpoint(dir.path(), options).ok());
  ModelSpec spec;
  auto report = openAndBind(dir.path(), &spec);
  ASSERT_TRUE(report.ok()) << report.status().message();
  EXPECT_TRUE(report->warnings.empty()) << report->warnings.front();
  EXPECT_EQ(spec.family, c.family);
  for (const LayerSpec &layer : spec.layers)
    if (layer.mlp == MlpKind::Moe)
      EXPECT_EQ(layer.expertLayout, c.layout) << "layer " << layer.index;

  auto checkpoint = Checkpoint::open(dir.path());
  ASSERT_TRUE(checkpoint.ok());
  size_t mtpTensors = report->ignoredTensors.size();
  EXPECT_EQ(spec.tensors().size() + mtpTensors, (*checkpoint)->tensorCount());
  EXPECT_EQ((*checkpoint)->shards().size(), static_cast<size_t>(c.shards));
  ModelSummary fromWeights = summarizeCheckpoint(spec, **checkpoint);
  ModelSummary fromConfig = summarizeFromConfig(spec);
  EXPECT_EQ(fromWeights.totalParameters, fromConfig.totalParameters);
  EXPECT_EQ(fromWeights.activeParameters, fromConfig.activeParameters);
  EXPECT_LT(fromWeights.activeParameters, fromWeights.totalParameters);
}

INSTANTIATE_TEST_SUITE_P(AllFamilies, SyntheticFamilies, ::testing::ValuesIn([] {
                           std::vector<LayoutCase> cases;
                           for (ModelFamily family : allFamilies) {
                             cases.push_back({family, ExpertLayout::PerExpert, 1});
                             cases.push_back({family, ExpertLayout::Fused, 1});
                             cases.push_back({family, ExpertLayout::PerExpert, 2});
                           }
                           return cases;
                         }()),
                         [](const ::testing::TestParamInfo<LayoutCase> &info) {
                           return familyTestName(info.param.family) +
                                  (info.param.layout == ExpertLayout::Fused ? "_fused" : "_per_expert") + "_" +
                                  std::to_string(info.param.shards) + "shards";
                         });

TEST(ModelSpec, FamilySpecificsAreNormalised) {
  auto parse = [](ModelFamily family) {
    auto spec = ModelSpec::fromConfigText(syntheticConfigJson(family, false), "config.json");
    EXPECT_TRUE(spec.ok()) << spec.status().message();
    return spec.take();
  };
  ModelSpec mixtral = parse(ModelFamily::Mixtral);
  EXPECT_TRUE(mixtral.router.normalizeTopK);
  EXPECT_EQ(mixtral.layers[0].moePrefix, "block_sparse_moe.");
  EXPECT_EQ(mixtral.rope.theta, 1e6);

  ModelSpec qwen2 = parse(ModelFamily::Qwen2Moe);
  EXPECT_EQ(qwen2.layers[1].mlp, MlpKind::Dense) << "mlp_only_layers [1]";
  EXPECT_EQ(qwen2.layers[0].shared.intermediateSize, 64);
  EXPECT_TRUE(qwen2.layers[0].shared.gated);
  EXPECT_TRUE(qwen2.attention.qkvBias);
  EXPECT_FALSE(qwen2.attention.outputBias);
  EXPECT_FALSE(qwen2.router.normalizeTopK);

  ModelSpec qwen3 = parse(ModelFamily::Qwen3Moe);
  EXPECT_EQ(qwen3.attention.qkNorm, QkNormKind::PerHead);
  EXPECT_EQ(qwen3.attention.headDim, 32) << "explicit head_dim, not hidden/heads";
  for (const TensorSpec &tensor : qwen3.tensors())
    if (tensor.role == TensorRole::QueryNorm)
      EXPECT_EQ(tensor.shape, std::vector<int64_t>{32});

  ModelSpec olmoe = parse(ModelFamily::Olmoe);
  EXPECT_EQ(olmoe.attention.qkNorm, QkNormKind::FullWidth);
  for (const TensorSpec &tensor : olmoe.tensors())
    if (tensor.role == TensorRole::QueryNorm)
      EXPECT_EQ(tensor.shape, std::vector<int64_t>{64}) << "full projection width";

  ModelSpec v2 = parse(ModelFamily::DeepseekV2);
  EXPECT_EQ(v2.attention.kind, AttentionKind::MultiHeadLatent);
  EXPECT_EQ(v2.rope.layout, RopeLayout::Interleaved);
  EXPECT_EQ(v2.rope.scaling, RopeScalingKind::Yarn);
  EXPECT_EQ(v2.rope.rotaryDim, 8);
  double m = 0.1 * 0.707 * std::log(40.0) + 1.0;
  EXPECT_NEAR(v2.attention.softmaxScale, m * m / std::sqrt(24.0), 1e-12);
  EXPECT_EQ(v2.layers[0].mlp, MlpKind::Dense);
  EXPECT_EQ(v2.layers[1].shared.intermediateSize, 2 * 32) << "n_shared_experts x width";
  EXPECT_FALSE(v2.layers[1].shared.gated);

  ModelSpec v3 = parse(ModelFamily::DeepseekV3);
  EXPECT_EQ(v3.router.scoring, RouterScoring::Sigmoid);
  EXPECT_EQ(v3.router.selection, ExpertSelection::GroupLimitedTopTwoSum);
  EXPECT_TRUE(v3.router.correctionBias);
  EXPECT_EQ(v3.router.scalingFactor, 2.5);
  EXPECT_EQ(v3.attention.queryLoraRank, 48);
  EXPECT_EQ(v3.numMtpLayers, 1);

  ModelSpec phi = parse(ModelFamily::PhiMoe);
  EXPECT_EQ(phi.normKind, NormKind::LayerNorm);
  EXPECT_EQ(phi.router.scoring, RouterScoring::SparseMixer);
  EXPECT_EQ(phi.rope.scaling, RopeScalingKind::LongRope);
  EXPECT_EQ(phi.rope.longFactor.size(), 8u);
  EXPECT_TRUE(phi.lmHeadBias);
  EXPECT_TRUE(phi.attention.outputBias);
}

TEST(ModelSpec, RopeParametersFromTransformersV5) {
  json config = json::parse(syntheticConfigJson(ModelFamily::Mixtral, false));
  config.erase("rope_theta");
  config["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5e5}};
  auto spec = ModelSpec::fromConfigText(config.dump(), "config.json");
  ASSERT_TRUE(spec.ok()) << spec.status().message();
  EXPECT_EQ(spec->rope.theta, 5e5);
  EXPECT_EQ(spec->rope.scaling, RopeScalingKind::None);
}

TEST(ModelSpec, FlagshipConfigsGivePublishedParameterCounts) {
  json published = json::parse(readFile(dataDir() + "/configs/published.json"));
  int checked = 0;
  for (auto &[name, expected] : published.items()) {
    if (name[0] == '_')
      continue;
    std::string path = dataDir() + "/configs/" + name + ".json";
    auto spec = ModelSpec::fromConfigFile(path);
    ASSERT_TRUE(spec.ok()) << spec.status().message();
    ModelSummary summary = summarizeFromConfig(*spec);
    double unit = expected["unit"].get<double>();
    // Within 1%, or, where the publisher rounded coarser than 1%, within
    // that rounding (half a unit below) or truncation (a unit above).
    auto check = [&](const char *what, double ours, double theirs) {
      double below = std::max(0.01 * theirs, unit / 2), above = std::max(0.01 * theirs, unit);
      EXPECT_GE(ours, theirs - below) << name << " " << what << ": " << ours << "B vs " << theirs;
      EXPECT_LT(ours, theirs + above) << name << " " << what << ": " << ours << "B vs " << theirs;
    };
    double total = summary.totalParameters / 1e9;
    double active = summary.activeParameters / 1e9;
    if (expected.value("active_excludes_input_embedding", false))
      active -= static_cast<double>(spec->vocabSize * spec->hiddenSize) / 1e9;
    check("total", total, expected["total"].get<double>());
    check("active", active, expected["active"].get<double>());
    ++checked;
  }
  EXPECT_EQ(checked, 11);

  // The headline numbers of the issue, tighter than the test above.
  auto mixtral = ModelSpec::fromConfigFile(dataDir() + "/configs/Mixtral-8x7B-v0.1.json");
  ASSERT_TRUE(mixtral.ok());
  ModelSummary summary = summarizeFromConfig(*mixtral);
  EXPECT_NEAR(summary.totalParameters / 1e9, 46.7, 0.467);
  EXPECT_NEAR(summary.activeParameters / 1e9, 12.9, 0.129);
  EXPECT_EQ(summary.totalBytes, summary.totalParameters * 2) << "bf16";
}

TEST(ModelSpec, DeepseekV3ConfigOnlyBytesCountFp8AndScales) {
  auto spec = ModelSpec::fromConfigFile(dataDir() + "/configs/DeepSeek-V3.json");
  ASSERT_TRUE(spec.ok()) << spec.status().message();
  EXPECT_TRUE(spec->fp8BlockScaled);
  ModelSummary summary = summarizeFromConfig(*spec);
  // The released checkpoint is about 642 GB (FP8 weights, bf16 rest, scales)
  // without its MTP layer; we count the decoder only.
  EXPECT_GT(summary.totalBytes, 660e9 * 1.0) << "at least one byte per parameter";
  EXPECT_LT(summary.totalBytes, 700e9);
  EXPECT_GT(summary.dtypes.at("F8_E4M3").parameters, 650e9);
  EXPECT_GT(summary.dtypes.at("F32").bytes, 0) << "block scales";
}

TEST(ModelSpec, UnsupportedArchitecturesAreRejectedWithTheSupportedList) {
  for (const char *name : {"gpt-oss-20b", "granite-3.0-1b-a400m", "dbrx-base", "Llama-3-8B"}) {
    std::string path = dataDir() + "/configs/" + name + ".json";
    auto spec = ModelSpec::fromConfigFile(path);
    expectErrorContains(spec.status(),
                        {path, "unsupported architecture", "supported: MixtralForCausalLM", "DeepseekV3ForCausalLM"});
  }
  auto spec = ModelSpec::fromConfigText(R"({"model_type": "gpt_oss"})", "cfg.json");
  expectErrorContains(spec.status(), {"cfg.json", "unsupported architecture gpt_oss"});
}

TEST(ModelSpec, ModelTypeIsEnoughWhenArchitecturesIsAbsent) {
  json config = json::parse(syntheticConfigJson(ModelFamily::Olmoe, false));
  config.erase("architectures");
  auto spec = ModelSpec::fromConfigText(config.dump(), "config.json");
  ASSERT_TRUE(spec.ok()) << spec.status().message();
  EXPECT_EQ(spec->family, ModelFamily::Olmoe);
}

struct ConfigErrorCase {
  std::string description;
  ModelFamily family;
  std::function<void(json &)> edit;
  std::vector<std::string> fragments;
};

void PrintTo(const ConfigErrorCase &c, std::ostream *os) { *os << c.description; }

class ConfigErrors : public ::testing::TestWithParam<ConfigErrorCase> {};

TEST_P(ConfigErrors, NameTheFileAndTheKey) {
  const ConfigErrorCase &c = GetParam();
  json config = json::parse(syntheticConfigJson(c.family, false));
  c.edit(config);
  auto spec = ModelSpec::fromConfigText(config.dump(), "dir/config.json");
  ASSERT_FALSE(spec.ok()) << c.description;
  std::vector<std::string> fragments = c.fragments;
  fragments.push_back("dir/config.json");
  for (const std::string &fragment : fragments)
    EXPECT_NE(spec.status().message().find(fragment), std::string::npos)
        << c.description << ": " << spec.status().message() << "\nmissing: " << fragment;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, ConfigErrors,
    ::testing::Values(ConfigErrorCase{"missing hidden_size",
                                      ModelFamily::Mixtral,
                                      [](json &c) { c.erase("hidden_size"); },
                                      {"missing required key 'hidden_size'"}},
                      ConfigErrorCase{"missing expert count",
                                      ModelFamily::Qwen3Moe,
                                      [](json &c) { c.erase("num_experts"); },
                                      {"missing required key 'num_experts'"}},
                      ConfigErrorCase{"missing kv_lora_rank",
                                      ModelFamily::DeepseekV2,
                                      [](json &c) { c.erase("kv_lora_rank"); },
                                      {"missing required key 'kv_lora_rank'"}},
                      ConfigErrorCase{"string for an integer",
                                      ModelFamily::Olmoe,
                                      [](json &c) { c["num_hidden_layers"] = "two"; },
                                      {"'num_hidden_layers' must be an integer"}},
                      ConfigErrorCase{"zero layers",
                                      ModelFamily::Mixtral,
                                      [](json &c) { c["num_hidden_layers"] = 0; },
                                      {"'num_hidden_layers' must be between 1 and 1024"}},
                      ConfigErrorCase{"absurd layer count",
                                      ModelFamily::Mixtral,
                                      [](json &c) { c["num_hidden_layers"] = 1000000000; },
                                      {"'num_hidden_layers'", "got 1000000000"}},
                      ConfigErrorCase{"negative shared expert width",
                                      ModelFamily::Qwen2Moe,
                                      [](json &c) { c["shared_expert_intermediate_size"] = -5; },
                                      {"shared expert intermediate size = -5"}},
                      ConfigErrorCase{"negative q lora rank",
                                      ModelFamily::DeepseekV3,
                                      [](json &c) { c["q_lora_rank"] = -1; },
                                      {"q_lora_rank = -1"}},
                      ConfigErrorCase{"top-k above the expert count",
                                      ModelFamily::Mixtral,
                                      [](json &c) { c["num_experts_per_tok"] = 9; },
                                      {"num_experts_per_tok (9)", "number of experts (4)"}},
                      ConfigErrorCase{"heads not a multiple of kv heads",
                                      ModelFamily::Qwen2Moe,
                                      [](json &c) { c["num_key_value_heads"] = 3; },
                                      {"num_attention_heads (4)", "num_key_value_heads (3)"}},
                      ConfigErrorCase{"unknown rope scaling",
                                      ModelFamily::Mixtral,
                                      [](json &c) {
                                        c["rope_scaling"] = {{"type", "wild"}};
                                      },
                                      {"unsupported rope scaling type 'wild'"}},
                      ConfigErrorCase{"yarn without its original length",
                                      ModelFamily::DeepseekV2,
                                      [](json &c) { c["rope_scaling"].erase("original_max_position_embeddings"); },
                                      {"original_max_position_embeddings"}},
                      ConfigErrorCase{"bad group routing",
                                      ModelFamily::DeepseekV3,
                                      [](json &c) { c["n_group"] = 3; },
                                      {"n_group", "n_routed_experts (8)"}},
                      ConfigErrorCase{"unknown topk_method",
                                      ModelFamily::DeepseekV3,
                                      [](json &c) { c["topk_method"] = "magic"; },
                                      {"unsupported topk_method 'magic'"}},
                      ConfigErrorCase{"unknown quantization",
                                      ModelFamily::DeepseekV3,
                                      [](json &c) {
                                        c["quantization_config"] = {{"quant_method", "awq"}};
                                      },
                                      {"quant_method 'awq'"}},
                      ConfigErrorCase{"dense layer without a width",
                                      ModelFamily::Qwen2Moe,
                                      [](json &c) { c.erase("intermediate_size"); },
                                      {"layer 1 is dense", "intermediate_size"}},
                      ConfigErrorCase{"longrope factors of the wrong length",
                                      ModelFamily::PhiMoe,
                                      [](json &c) {
                                        c["rope_scaling"]["long_factor"] = {1.0, 2.0};
                                      },
                                      {"long_factor", "head_dim/2 = 8"}},
                      ConfigErrorCase{"unknown dtype",
                                      ModelFamily::Mixtral,
                                      [](json &c) { c["torch_dtype"] = "int4"; },
                                      {"'torch_dtype'", "'int4'"}},
                      ConfigErrorCase{"architectures not a list",
                                      ModelFamily::Mixtral,
                                      [](json &c) { c["architectures"] = "MixtralForCausalLM"; },
                                      {"'architectures' must be a non-empty list"}},
                      // Numbers that parse but make every result NaN or infinite.
                      ConfigErrorCase{"zero norm epsilon",
                                      ModelFamily::Mixtral,
                                      [](json &c) { c["rms_norm_eps"] = 0; },
                                      {"rms_norm_eps", "must be a positive finite number"}},
                      ConfigErrorCase{"negative norm epsilon",
                                      ModelFamily::DeepseekV2,
                                      [](json &c) { c["rms_norm_eps"] = -1e-6; },
                                      {"rms_norm_eps", "positive"}},
                      ConfigErrorCase{"zero rope theta",
                                      ModelFamily::Qwen3Moe,
                                      [](json &c) { c["rope_theta"] = 0; },
                                      {"rope_theta = 0", "positive finite"}},
                      ConfigErrorCase{"negative rope theta",
                                      ModelFamily::Olmoe,
                                      [](json &c) { c["rope_theta"] = -10000.0; },
                                      {"rope_theta", "positive finite"}},
                      ConfigErrorCase{"unknown activation",
                                      ModelFamily::Mixtral,
                                      [](json &c) { c["hidden_act"] = "relu_squared"; },
                                      {"'hidden_act'", "relu_squared", "silu"}},
                      ConfigErrorCase{"negative clip_qkv",
                                      ModelFamily::Olmoe,
                                      [](json &c) { c["clip_qkv"] = -1.0; },
                                      {"clip_qkv", ">= 0"}},
                      ConfigErrorCase{"zero routed scaling",
                                      ModelFamily::DeepseekV2,
                                      [](json &c) { c["routed_scaling_factor"] = 0.0; },
                                      {"routed_scaling_factor = 0", "positive finite"}},
                      ConfigErrorCase{"negative jitter",
                                      ModelFamily::PhiMoe,
                                      [](json &c) { c["router_jitter_noise"] = -0.5; },
                                      {"router_jitter_noise = -0.5", ">= 0"}}),
    [](const ::testing::TestParamInfo<ConfigErrorCase> &info) { return testNameFrom(info.param.description); });

TEST(ModelSpec, ConfigThatIsNotJsonOrMissingIsNamed) {
  expectErrorContains(ModelSpec::fromConfigText("{", "x/config.json").status(), {"x/config.json", "not valid JSON"});
  expectErrorContains(ModelSpec::fromConfigText("[]", "x/config.json").status(), {"x/config.json", "JSON object"});
  expectErrorContains(ModelSpec::fromConfigFile("/nonexistent/config.json").status(),
                      {"/nonexistent/config.json", "cannot read"});
}

TEST(ModelSpec, IntegralFloatsAreAcceptedForSizes) {
  json config = json::parse(syntheticConfigJson(ModelFamily::Mixtral, false));
  config["hidden_size"] = 64.0;
  auto spec = ModelSpec::fromConfigText(config.dump(), "config.json");
  ASSERT_TRUE(spec.ok()) << spec.status().message();
  EXPECT_EQ(spec->hiddenSize, 64);
}

TEST(CheckpointValidation, MissingTensorIsNamedWithItsExpectedShape) {
  TempDir dir;
  SyntheticOptions options;
  writeWithConfig(dir.path(), options, [](json &c) { c["num_local_experts"] = 5; });
  expectErrorContains(openAndBind(dir.path()).status(),
                      {"'model.layers.0.block_sparse_moe.gate.weight'", "shape [4, 64]", "expected [5, 64]"});
  // With the router right but an expert missing, the expert is named.
  TempDir dir2;
  ASSERT_TRUE(writeSyntheticCheckpoint(dir2.path(), options).ok());
  rewriteCheckpoint(dir2.path(), [](const std::string &name, DType &, std::vector<int64_t> &) {
    return name != "model.layers.1.block_sparse_moe.experts.2.w3.weight";
  });
  expectErrorContains(
      openAndBind(dir2.path()).status(),
      {dir2.path(), "missing tensor 'model.layers.1.block_sparse_moe.experts.2.w3.weight'", "expert_up", "[48, 64]"});
}

TEST(CheckpointValidation, WrongShapeForTheConfigIsNamed) {
  TempDir dir;
  SyntheticOptions options;
  options.family = ModelFamily::Qwen3Moe;
  writeWithConfig(dir.path(), options, [](json &c) { c["moe_intermediate_size"] = 20; });
  expectErrorContains(
      openAndBind(dir.path()).status(),
      {"model.safetensors", "'model.layers.0.mlp.experts.0.gate_proj.weight'", "shape [24, 64]", "expected [20, 64]"});
}

TEST(CheckpointValidation, NonFloatWeightIsNamed) {
  TempDir dir;
  SyntheticOptions options;
  options.dtype = DType::F32;
  ASSERT_TRUE(writeSyntheticCheckpoint(dir.path(), options).ok());
  rewriteCheckpoint(dir.path(), [](const std::string &name, DType &dtype, std::vector<int64_t> &) {
    if (name == "model.norm.weight")
      dtype = DType::I32; // same element size as the F32 it replaces
    return true;
  });
  expectErrorContains(openAndBind(dir.path()).status(),
                      {"'model.norm.weight'", "dtype I32", "expected F32, F16 or BF16"});
}

TEST(CheckpointValidation, ExtraTensorsWarnAndMtpLayersAreIgnored) {
  TempDir dir;
  SyntheticOptions options;
  options.family = ModelFamily::DeepseekV3;
  options.extraTensors = {"model.rotary_emb.inv_freq", "vision.tower.weight"};
  ASSERT_TRUE(writeSyntheticCheckpoint(dir.path(), options).ok());
  auto report = openAndBind(dir.path());
  ASSERT_TRUE(report.ok()) << report.status().message();
  ASSERT_EQ(report->warnings.size(), 2u);
  EXPECT_NE(report->warnings[0].find("'model.rotary_emb.inv_freq'"), std::string::npos);
  EXPECT_EQ(report->ignoredTensors.size(), 2u) << "the MTP layer's tensors";
  for (const std::string &name : report->ignoredTensors)
    EXPECT_EQ(name.rfind("model.layers.3.", 0), 0u) << name;
}

TEST(CheckpointValidation, Fp8WeightWithoutScalesIsNamed) {
  TempDir dir;
  SyntheticOptions options;
  options.family = ModelFamily::DeepseekV3;
  options.fp8 = true;
  ASSERT_TRUE(writeSyntheticCheckpoint(dir.path(), options).ok());
  rewriteCheckpoint(dir.path(), [](const std::string &name, DType &, std::vector<int64_t> &) {
    return name != "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv";
  });
  expectErrorContains(openAndBind(dir.path()).status(),
                      {"FP8 tensor 'model.layers.2.mlp.experts.5.up_proj.weight'",
                       "expected tensor 'model.layers.2.mlp.experts.5.up_proj.weight_scale_inv'"});
}

TEST(CheckpointValidation, Fp8CheckpointBindsAndCountsScaleBytes) {
  TempDir dir;
  SyntheticOptions options;
  options.family = ModelFamily::DeepseekV3;
  options.fp8 = true;
  options.shards = 2;
  ASSERT_TRUE(writeSyntheticCheckpoint(dir.path(), options).ok());
  ModelSpec spec;
  auto report = openAndBind(dir.path(), &spec);
  ASSERT_TRUE(report.ok()) << report.status().message();
  EXPECT_FALSE(report->scaleTensors.empty());
  auto checkpoint = Checkpoint::open(dir.path());
  ModelSummary fromWeights = summarizeCheckpoint(spec, **checkpoint);
  ModelSummary fromConfig = summarizeFromConfig(spec);
  EXPECT_EQ(fromWeights.dtypes.at("F8_E4M3").parameters, fromConfig.dtypes.at("F8_E4M3").parameters);
  EXPECT_EQ(fromWeights.dtypes.at("F8_E4M3").bytes, fromConfig.dtypes.at("F8_E4M3").bytes);
  EXPECT_GT(fromWeights.dtypes.at("F32").bytes, 0);
}

TEST(CheckpointValidation, TransposedFusedExpertsAreDetectedByShape) {
  // Some exporters store fused experts [E, in, out]; with 2I != H the shape
  // tells the orientation apart.
  TempDir dir;
  SyntheticOptions options;
  options.expertLayout = ExpertLayout::Fused;
  options.dtype = DType::F32;
  ASSERT_TRUE(writeSyntheticCheckpoint(dir.path(), options).ok());
  rewriteCheckpoint(dir.path(), [](const std::string &name, DType &, std::vector<int64_t> &shape) {
    if (name.find("experts.") != std::string::npos)
      std::swap(shape[1], shape[2]);
    return true;
  });
  ModelSpec spec;
  auto report = openAndBind(dir.path(), &spec);
  ASSERT_TRUE(report.ok()) << report.status().message();
  EXPECT_EQ(spec.layers[0].expertLayout, ExpertLayout::Fused);
  EXPECT_TRUE(spec.layers[0].fusedTransposed);
  EXPECT_EQ(spec.layers[0].moePrefix, "mlp.");
}
