//===- ModelSpec.cpp - Expected tensors and checkpoint validation ---------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Frontend/ModelSpec.h"
#include "moe/Frontend/Checkpoint.h"

#include <algorithm>
#include <map>
#include <set>

namespace moe {

std::string_view familyName(ModelFamily family) {
  switch (family) {
  case ModelFamily::Mixtral:
    return "mixtral";
  case ModelFamily::Qwen2Moe:
    return "qwen2_moe";
  case ModelFamily::Qwen3Moe:
    return "qwen3_moe";
  case ModelFamily::Olmoe:
    return "olmoe";
  case ModelFamily::DeepseekV2:
    return "deepseek_v2";
  case ModelFamily::DeepseekV3:
    return "deepseek_v3";
  case ModelFamily::PhiMoe:
    return "phimoe";
  }
  return "?";
}

std::string_view normKindName(NormKind kind) { return kind == NormKind::RmsNorm ? "rmsnorm" : "layernorm"; }
std::string_view attentionKindName(AttentionKind kind) { return kind == AttentionKind::GroupedQuery ? "gqa" : "mla"; }
std::string_view qkNormKindName(QkNormKind kind) {
  switch (kind) {
  case QkNormKind::None:
    return "none";
  case QkNormKind::PerHead:
    return "per-head";
  case QkNormKind::FullWidth:
    return "full-width";
  }
  return "?";
}
std::string_view ropeLayoutName(RopeLayout layout) { return layout == RopeLayout::Half ? "half" : "interleaved"; }
std::string_view ropeScalingName(RopeScalingKind kind) {
  switch (kind) {
  case RopeScalingKind::None:
    return "none";
  case RopeScalingKind::Linear:
    return "linear";
  case RopeScalingKind::Dynamic:
    return "dynamic";
  case RopeScalingKind::Yarn:
    return "yarn";
  case RopeScalingKind::LongRope:
    return "longrope";
  }
  return "?";
}
std::string_view routerScoringName(RouterScoring scoring) {
  switch (scoring) {
  case RouterScoring::Softmax:
    return "softmax";
  case RouterScoring::Sigmoid:
    return "sigmoid";
  case RouterScoring::SparseMixer:
    return "sparsemixer";
  }
  return "?";
}
std::string_view expertSelectionName(ExpertSelection selection) {
  switch (selection) {
  case ExpertSelection::TopK:
    return "top-k";
  case ExpertSelection::GroupLimitedMax:
    return "group-limited (group max)";
  case ExpertSelection::GroupLimitedTopTwoSum:
    return "group-limited (group top-2 sum)";
  }
  return "?";
}
std::string_view expertSelectionKey(ExpertSelection selection) {
  switch (selection) {
  case ExpertSelection::TopK:
    return "top-k";
  case ExpertSelection::GroupLimitedMax:
    return "group-max";
  case ExpertSelection::GroupLimitedTopTwoSum:
    return "group-top2-sum";
  }
  return "top-k";
}
std::optional<ExpertSelection> parseExpertSelectionKey(std::string_view key) {
  for (ExpertSelection selection :
       {ExpertSelection::TopK, ExpertSelection::GroupLimitedMax, ExpertSelection::GroupLimitedTopTwoSum})
    if (expertSelectionKey(selection) == key)
      return selection;
  return std::nullopt;
}
std::string_view expertLayoutName(ExpertLayout layout) {
  return layout == ExpertLayout::PerExpert ? "per-expert" : "fused";
}

namespace {

struct RoleInfo {
  TensorRole role;
  std::string_view name;
  RoleGroup group;
};

constexpr RoleInfo roleTable[] = {
    {TensorRole::Embedding, "embedding", RoleGroup::Embedding},
    {TensorRole::LmHead, "lm_head", RoleGroup::LmHead},
    {TensorRole::LmHeadBias, "lm_head_bias", RoleGroup::LmHead},
    {TensorRole::FinalNorm, "final_norm", RoleGroup::Norms},
    {TensorRole::FinalNormBias, "final_norm_bias", RoleGroup::Norms},
    {TensorRole::AttentionNorm, "attention_norm", RoleGroup::Norms},
    {TensorRole::AttentionNormBias, "attention_norm_bias", RoleGroup::Norms},
    {TensorRole::MlpNorm, "mlp_norm", RoleGroup::Norms},
    {TensorRole::MlpNormBias, "mlp_norm_bias", RoleGroup::Norms},
    {TensorRole::QueryProj, "q_proj", RoleGroup::Attention},
    {TensorRole::QueryBias, "q_bias", RoleGroup::Attention},
    {TensorRole::KeyProj, "k_proj", RoleGroup::Attention},
    {TensorRole::KeyBias, "k_bias", RoleGroup::Attention},
    {TensorRole::ValueProj, "v_proj", RoleGroup::Attention},
    {TensorRole::ValueBias, "v_bias", RoleGroup::Attention},
    {TensorRole::OutputProj, "o_proj", RoleGroup::Attention},
    {TensorRole::OutputBias, "o_bias", RoleGroup::Attention},
    {TensorRole::QueryNorm, "q_norm", RoleGroup::Attention},
    {TensorRole::KeyNorm, "k_norm", RoleGroup::Attention},
    {TensorRole::QueryDownProj, "q_a_proj", RoleGroup::Attention},
    {TensorRole::QueryDownNorm, "q_a_norm", RoleGroup::Attention},
    {TensorRole::QueryUpProj, "q_b_proj", RoleGroup::Attention},
    {TensorRole::KvDownProj, "kv_a_proj", RoleGroup::Attention},
    {TensorRole::KvDownNorm, "kv_a_norm", RoleGroup::Attention},
    {TensorRole::KvUpProj, "kv_b_proj", RoleGroup::Attention},
    {TensorRole::DenseGate, "dense_gate", RoleGroup::DenseMlp},
    {TensorRole::DenseUp, "dense_up", RoleGroup::DenseMlp},
    {TensorRole::DenseDown, "dense_down", RoleGroup::DenseMlp},
    {TensorRole::Router, "router", RoleGroup::Router},
    {TensorRole::RouterCorrectionBias, "router_correction_bias", RoleGroup::Router},
    {TensorRole::ExpertGate, "expert_gate", RoleGroup::RoutedExperts},
    {TensorRole::ExpertUp, "expert_up", RoleGroup::RoutedExperts},
    {TensorRole::ExpertDown, "expert_down", RoleGroup::RoutedExperts},
    {TensorRole::ExpertGateUpFused, "experts_gate_up", RoleGroup::RoutedExperts},
    {TensorRole::ExpertDownFused, "experts_down", RoleGroup::RoutedExperts},
    {TensorRole::SharedGate, "shared_gate", RoleGroup::SharedExperts},
    {TensorRole::SharedUp, "shared_up", RoleGroup::SharedExperts},
    {TensorRole::SharedDown, "shared_down", RoleGroup::SharedExperts},
    {TensorRole::SharedExpertGate, "shared_expert_gate", RoleGroup::SharedExperts},
};

const RoleInfo &roleInfo(TensorRole role) { return roleTable[static_cast<size_t>(role)]; }

/// The on-disk projection names of a family's expert MLPs.
struct ExpertNames {
  std::string_view gate, up, down;
};

ExpertNames expertNames(ModelFamily family) {
  if (family == ModelFamily::Mixtral || family == ModelFamily::PhiMoe)
    return {"w1", "w3", "w2"};
  return {"gate_proj", "up_proj", "down_proj"};
}

std::string layerPrefix(int64_t layer) { return concat("model.layers.", layer, "."); }

/// Appends the tensors of one decoder layer.
void appendLayerTensors(const ModelSpec &spec, const LayerSpec &layer, std::vector<TensorSpec> &out) {
  const int64_t H = spec.hiddenSize;
  const AttentionSpec &attention = spec.attention;
  const std::string prefix = layerPrefix(layer.index);
  auto add = [&](std::string name, std::vector<int64_t> shape, TensorRole role, bool linear = false,
                 int64_t expert = -1) {
    out.push_back(TensorSpec{prefix + name, std::move(shape), role, layer.index, expert, linear});
  };
  auto addNorm = [&](const std::string &name, TensorRole weight, TensorRole bias) {
    add(name + ".weight", {H}, weight);
    if (spec.normKind == NormKind::LayerNorm)
      add(name + ".bias", {H}, bias);
  };

  addNorm("input_layernorm", TensorRole::AttentionNorm, TensorRole::AttentionNormBias);
  addNorm("post_attention_layernorm", TensorRole::MlpNorm, TensorRole::MlpNormBias);

  const std::string attn = "self_attn.";
  if (attention.kind == AttentionKind::GroupedQuery) {
    int64_t qWidth = attention.numHeads * attention.headDim;
    int64_t kvWidth = attention.numKeyValueHeads * attention.headDim;
    add(attn + "q_proj.weight", {qWidth, H}, TensorRole::QueryProj, true);
    add(attn + "k_proj.weight", {kvWidth, H}, TensorRole::KeyProj, true);
    add(attn + "v_proj.weight", {kvWidth, H}, TensorRole::ValueProj, true);
    add(attn + "o_proj.weight", {H, qWidth}, TensorRole::OutputProj, true);
    if (attention.qkvBias) {
      add(attn + "q_proj.bias", {qWidth}, TensorRole::QueryBias);
      add(attn + "k_proj.bias", {kvWidth}, TensorRole::KeyBias);
      add(attn + "v_proj.bias", {kvWidth}, TensorRole::ValueBias);
    }
    if (attention.outputBias)
      add(attn + "o_proj.bias", {H}, TensorRole::OutputBias);
    if (attention.qkNorm == QkNormKind::PerHead) {
      add(attn + "q_norm.weight", {attention.headDim}, TensorRole::QueryNorm);
      add(attn + "k_norm.weight", {attention.headDim}, TensorRole::KeyNorm);
    } else if (attention.qkNorm == QkNormKind::FullWidth) {
      add(attn + "q_norm.weight", {qWidth}, TensorRole::QueryNorm);
      add(attn + "k_norm.weight", {kvWidth}, TensorRole::KeyNorm);
    }
  } else {
    int64_t qWidth = attention.numHeads * attention.headDim;
    if (attention.queryLoraRank > 0) {
      add(attn + "q_a_proj.weight", {attention.queryLoraRank, H}, TensorRole::QueryDownProj, true);
      add(attn + "q_a_layernorm.weight", {attention.queryLoraRank}, TensorRole::QueryDownNorm);
      add(attn + "q_b_proj.weight", {qWidth, attention.queryLoraRank}, TensorRole::QueryUpProj, true);
    } else {
      add(attn + "q_proj.weight", {qWidth, H}, TensorRole::QueryProj, true);
    }
    add(attn + "kv_a_proj_with_mqa.weight", {attention.kvLoraRank + attention.qkRopeHeadDim, H}, TensorRole::KvDownProj,
        true);
    add(attn + "kv_a_layernorm.weight", {attention.kvLoraRank}, TensorRole::KvDownNorm);
    add(attn + "kv_b_proj.weight",
        {attention.numHeads * (attention.qkNopeHeadDim + attention.valueHeadDim), attention.kvLoraRank},
        TensorRole::KvUpProj, true);
    add(attn + "o_proj.weight", {H, attention.numHeads * attention.valueHeadDim}, TensorRole::OutputProj, true);
  }

  if (layer.mlp == MlpKind::Dense) {
    int64_t I = layer.denseIntermediateSize;
    add("mlp.gate_proj.weight", {I, H}, TensorRole::DenseGate, true);
    add("mlp.up_proj.weight", {I, H}, TensorRole::DenseUp, true);
    add("mlp.down_proj.weight", {H, I}, TensorRole::DenseDown, true);
    return;
  }

  const std::string &moe = layer.moePrefix;
  const int64_t E = layer.numExperts, I = layer.expertIntermediateSize;
  add(moe + "gate.weight", {E, H}, TensorRole::Router);
  if (spec.router.correctionBias)
    add(moe + "gate.e_score_correction_bias", {E}, TensorRole::RouterCorrectionBias);
  if (layer.expertLayout == ExpertLayout::PerExpert) {
    ExpertNames names = expertNames(spec.family);
    for (int64_t e = 0; e < E; ++e) {
      std::string expert = concat(moe, "experts.", e, ".");
      add(concat(expert, names.gate, ".weight"), {I, H}, TensorRole::ExpertGate, true, e);
      add(concat(expert, names.up, ".weight"), {I, H}, TensorRole::ExpertUp, true, e);
      add(concat(expert, names.down, ".weight"), {H, I}, TensorRole::ExpertDown, true, e);
    }
  } else if (!layer.fusedTransposed) {
    add(moe + "experts.gate_up_proj", {E, 2 * I, H}, TensorRole::ExpertGateUpFused);
    add(moe + "experts.down_proj", {E, H, I}, TensorRole::ExpertDownFused);
  } else {
    add(moe + "experts.gate_up_proj", {E, H, 2 * I}, TensorRole::ExpertGateUpFused);
    add(moe + "experts.down_proj", {E, I, H}, TensorRole::ExpertDownFused);
  }

  const SharedExpertSpec &shared = layer.shared;
  if (shared.intermediateSize > 0) {
    // Qwen2-MoE has one gated "shared_expert"; DeepSeek fuses its shared
    // experts into one ungated "shared_experts" MLP.
    std::string sharedPrefix = shared.gated ? moe + "shared_expert." : moe + "shared_experts.";
    int64_t Is = shared.intermediateSize;
    add(sharedPrefix + "gate_proj.weight", {Is, H}, TensorRole::SharedGate, true);
    add(sharedPrefix + "up_proj.weight", {Is, H}, TensorRole::SharedUp, true);
    add(sharedPrefix + "down_proj.weight", {H, Is}, TensorRole::SharedDown, true);
    if (shared.gated)
      add(moe + "shared_expert_gate.weight", {1, H}, TensorRole::SharedExpertGate);
  }
}

} // namespace

std::string_view tensorRoleName(TensorRole role) { return roleInfo(role).name; }
RoleGroup roleGroup(TensorRole role) { return roleInfo(role).group; }
std::optional<TensorRole> parseTensorRole(std::string_view name) {
  for (const RoleInfo &info : roleTable)
    if (info.name == name)
      return info.role;
  return std::nullopt;
}
std::string_view roleGroupName(RoleGroup group) {
  static constexpr std::string_view names[kNumRoleGroups] = {
      "embedding", "lm_head", "attention", "norms", "dense_mlp", "router", "routed_experts", "shared_experts"};
  return names[static_cast<int>(group)];
}

std::string scaleInvName(const std::string &weightName) { return weightName + std::string(kScaleInvSuffix); }

std::vector<int64_t> fp8ScaleShape(const std::vector<int64_t> &weightShape) {
  std::vector<int64_t> shape;
  for (int64_t dim : weightShape)
    shape.push_back((dim + kFp8BlockSize - 1) / kFp8BlockSize);
  return shape;
}

int64_t ModelSpec::numMoeLayers() const {
  return std::count_if(layers.begin(), layers.end(), [](const LayerSpec &layer) { return layer.mlp == MlpKind::Moe; });
}

std::vector<TensorSpec> ModelSpec::tensors() const {
  std::vector<TensorSpec> out;
  out.push_back({"model.embed_tokens.weight", {vocabSize, hiddenSize}, TensorRole::Embedding});
  for (const LayerSpec &layer : layers)
    appendLayerTensors(*this, layer, out);
  out.push_back({"model.norm.weight", {hiddenSize}, TensorRole::FinalNorm});
  if (normKind == NormKind::LayerNorm)
    out.push_back({"model.norm.bias", {hiddenSize}, TensorRole::FinalNormBias});
  if (!tieWordEmbeddings)
    out.push_back({"lm_head.weight", {vocabSize, hiddenSize}, TensorRole::LmHead});
  if (lmHeadBias)
    out.push_back({"lm_head.bias", {vocabSize}, TensorRole::LmHeadBias});
  return out;
}

namespace {

/// Picks the expert layout of one MoE layer from the tensors present.
Status detectExpertLayout(const ModelSpec &spec, LayerSpec &layer, const Checkpoint &checkpoint) {
  const std::string prefix = layerPrefix(layer.index);
  std::vector<std::string> prefixes = {layer.moePrefix};
  if (layer.moePrefix != "mlp.")
    prefixes.push_back("mlp."); // transformers v5 renames block_sparse_moe.
  ExpertNames names = expertNames(spec.family);
  for (const std::string &moe : prefixes) {
    if (checkpoint.find(concat(prefix, moe, "experts.0.", names.gate, ".weight"))) {
      layer.moePrefix = moe;
      layer.expertLayout = ExpertLayout::PerExpert;
      return Status::success();
    }
    const TensorLocation *fused = checkpoint.find(prefix + moe + "experts.gate_up_proj");
    if (!fused)
      continue;
    layer.moePrefix = moe;
    layer.expertLayout = ExpertLayout::Fused;
    const std::vector<int64_t> &shape = fused->info->shape;
    const int64_t E = layer.numExperts, I = layer.expertIntermediateSize, H = spec.hiddenSize;
    // The standard orientation is [E, 2I, H]; some exporters store the
    // transpose. When 2I == H the two cannot be told apart: standard wins.
    layer.fusedTransposed = shape == std::vector<int64_t>{E, H, 2 * I} && 2 * I != H;
    return Status::success();
  }
  return Status::error(checkpoint.directory(), ": layer ", layer.index,
                       " is an MoE layer but has no experts: expected tensor '", prefix, layer.moePrefix, "experts.0.",
                       names.gate, ".weight' (per-expert layout) or '", prefix, layer.moePrefix,
                       "experts.gate_up_proj' (fused layout)");
}

std::string tensorFile(const TensorLocation &location) { return location.file->path(); }

} // namespace

Expected<CheckpointReport> bindCheckpoint(ModelSpec &spec, const Checkpoint &checkpoint) {
  for (LayerSpec &layer : spec.layers)
    if (layer.mlp == MlpKind::Moe)
      MOE_RETURN_IF_ERROR(detectExpertLayout(spec, layer, checkpoint));

  CheckpointReport report;
  std::set<std::string> expected;
  for (const TensorSpec &tensor : spec.tensors()) {
    expected.insert(tensor.name);
    const TensorLocation *location = checkpoint.find(tensor.name);
    if (!location)
      return Status::error(checkpoint.directory(), ": missing tensor '", tensor.name, "' (",
                           tensorRoleName(tensor.role), ", expected shape ", formatShape(tensor.shape),
                           ") required by ", spec.architecture, " config.json");
    const TensorInfo &info = *location->info;
    if (info.shape != tensor.shape)
      return Status::error(tensorFile(*location), ": tensor '", tensor.name, "' has shape ", formatShape(info.shape),
                           ", expected ", formatShape(tensor.shape), " from config.json (", tensorRoleName(tensor.role),
                           ")");
    bool isFp8 = info.dtype == DType::F8E4M3 || info.dtype == DType::F8E5M2;
    if (isFp8 && tensor.isLinearWeight) {
      std::string scale = scaleInvName(tensor.name);
      const TensorLocation *scaleLocation = checkpoint.find(scale);
      if (!scaleLocation)
        return Status::error(tensorFile(*location), ": FP8 tensor '", tensor.name,
                             "' has no block scales: expected tensor '", scale, "'");
      std::vector<int64_t> scaleShape = fp8ScaleShape(tensor.shape);
      if (scaleLocation->info->shape != scaleShape || !isFloatDType(scaleLocation->info->dtype))
        return Status::error(tensorFile(*scaleLocation), ": tensor '", scale, "' has shape ",
                             formatShape(scaleLocation->info->shape), " and dtype ",
                             dtypeName(scaleLocation->info->dtype), ", expected float ", formatShape(scaleShape),
                             " (128x128 blocks of '", tensor.name, "')");
      expected.insert(scale);
      report.scaleTensors.push_back(scale);
    } else if (!isFloatDType(info.dtype) || isFp8) {
      return Status::error(tensorFile(*location), ": tensor '", tensor.name, "' has dtype ", dtypeName(info.dtype),
                           ", expected F32, F16 or BF16",
                           tensor.isLinearWeight ? " (or F8_E4M3 with a _scale_inv sibling)" : "");
    }
  }

  // Everything else is unexpected, except the MTP layers of DeepSeek-V3.
  std::vector<std::string> unexpected;
  for (const std::string &name : checkpoint.tensorNames()) {
    if (expected.count(name))
      continue;
    bool isMtp = false;
    for (int64_t j = 0; j < spec.numMtpLayers && !isMtp; ++j)
      isMtp = name.rfind(layerPrefix(spec.numLayers + j), 0) == 0;
    if (isMtp)
      report.ignoredTensors.push_back(name);
    else
      unexpected.push_back(name);
  }
  const size_t shown = 8;
  for (size_t i = 0; i < unexpected.size() && i < shown; ++i)
    report.warnings.push_back(concat("unexpected tensor '", unexpected[i], "' is not used by ", spec.architecture));
  if (unexpected.size() > shown)
    report.warnings.push_back(concat("... and ", unexpected.size() - shown, " more unexpected tensors"));
  return report;
}

} // namespace moe
