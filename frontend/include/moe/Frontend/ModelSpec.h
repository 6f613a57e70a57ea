//===- ModelSpec.h - One normalised description of an MoE model -*- C++ -*-===//
//
// Part of moec. Every supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
// DeepSeek-V2/V3, PhiMoE) is parsed from its config.json into this one
// description: dimensions, per-layer attention and MLP kinds, RoPE, router,
// shared experts and the tensor name and shape of every role. Families are
// data: code downstream never branches on the family, only on these fields.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_FRONTEND_MODELSPEC_H
#define MOE_FRONTEND_MODELSPEC_H

#include "moe/Frontend/DType.h"
#include "moe/Support/Status.h"

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

class Checkpoint;

enum class ModelFamily { Mixtral, Qwen2Moe, Qwen3Moe, Olmoe, DeepseekV2, DeepseekV3, PhiMoe };
enum class NormKind { RmsNorm, LayerNorm };
enum class AttentionKind { GroupedQuery, MultiHeadLatent };
enum class QkNormKind { None, PerHead, FullWidth };
enum class RopeLayout { Half, Interleaved };
enum class RopeScalingKind { None, Linear, Dynamic, Yarn, LongRope };
enum class RouterScoring { Softmax, Sigmoid, SparseMixer };
enum class ExpertSelection { TopK, GroupLimitedMax, GroupLimitedTopTwoSum };
enum class MlpKind { Dense, Moe };
enum class ExpertLayout { PerExpert, Fused };

std::string_view familyName(ModelFamily family);
std::string_view normKindName(NormKind kind);
std::string_view attentionKindName(AttentionKind kind);
std::string_view qkNormKindName(QkNormKind kind);
std::string_view ropeLayoutName(RopeLayout layout);
std::string_view ropeScalingName(RopeScalingKind kind);
std::string_view routerScoringName(RouterScoring scoring);
std::string_view expertSelectionName(ExpertSelection selection);
/// The short name the moe dialect and packages use: "top-k", "group-max",
/// "group-top2-sum".
std::string_view expertSelectionKey(ExpertSelection selection);
/// The selection whose key is `key`, or nullopt.
std::optional<ExpertSelection> parseExpertSelectionKey(std::string_view key);
std::string_view expertLayoutName(ExpertLayout layout);

/// Rotary position embedding.
struct RopeSpec {
  RopeLayout layout = RopeLayout::Half;
  double theta = 10000.0;
  int64_t rotaryDim = 0; ///< Dimensions rotated per head.
  RopeScalingKind scaling = RopeScalingKind::None;
  double factor = 1.0;
  int64_t originalMaxPositions = 0;
  // YaRN.
  double betaFast = 32.0, betaSlow = 1.0, mscale = 1.0, mscaleAllDim = 0.0;
  bool truncate = true;
  // LongRoPE.
  std::vector<double> shortFactor, longFactor;
  double shortMscale = 1.0, longMscale = 1.0;
};

/// Self-attention of every layer.
struct AttentionSpec {
  AttentionKind kind = AttentionKind::GroupedQuery;
  int64_t numHeads = 0;
  int64_t numKeyValueHeads = 0; ///< Equal to numHeads for MLA.
  int64_t headDim = 0;          ///< Query/key width per head.
  int64_t valueHeadDim = 0;
  bool qkvBias = false;
  bool outputBias = false;
  QkNormKind qkNorm = QkNormKind::None;
  double clipQkv = 0.0; ///< 0: no clamp.
  // Multi-head latent attention (DeepSeek).
  int64_t queryLoraRank = 0; ///< 0: no query low-rank projection.
  int64_t kvLoraRank = 0;
  int64_t qkNopeHeadDim = 0;
  int64_t qkRopeHeadDim = 0;
  double softmaxScale = 0.0; ///< Multiplies q.k before the softmax.
};

/// How a token's experts and their weights are chosen.
struct RouterSpec {
  RouterScoring scoring = RouterScoring::Softmax;
  ExpertSelection selection = ExpertSelection::TopK;
  int64_t topK = 0;
  bool normalizeTopK = false; ///< Renormalise the chosen weights to sum 1.
  double scalingFactor = 1.0; ///< Multiplies the routed weights.
  int64_t numGroups = 1, topKGroups = 1;
  bool correctionBias = false; ///< DeepSeek-V3 e_score_correction_bias.
  double jitterEps = 0.0;      ///< PhiMoE sparsemixer threshold.
};

/// Experts that see every token.
struct SharedExpertSpec {
  int64_t intermediateSize = 0; ///< 0: no shared expert.
  bool gated = false;           ///< Scaled by sigmoid(x . gate) (Qwen2-MoE).
};

/// One decoder layer.
struct LayerSpec {
  int64_t index = 0;
  MlpKind mlp = MlpKind::Moe;
  int64_t denseIntermediateSize = 0; ///< For dense layers.
  int64_t numExperts = 0;
  int64_t expertIntermediateSize = 0;
  SharedExpertSpec shared;
  /// How the routed experts are stored on disk, and under which prefix
  /// ("block_sparse_moe." or "mlp."; transformers v5 saves use "mlp.").
  ExpertLayout expertLayout = ExpertLayout::PerExpert;
  std::string moePrefix;
  /// Fused tensors stored [E, in, out] instead of [E, out, in].
  bool fusedTransposed = false;
};

/// What a tensor is for.
enum class TensorRole {
  Embedding,
  LmHead,
  LmHeadBias,
  FinalNorm,
  FinalNormBias,
  AttentionNorm,
  AttentionNormBias,
  MlpNorm,
  MlpNormBias,
  QueryProj,
  QueryBias,
  KeyProj,
  KeyBias,
  ValueProj,
  ValueBias,
  OutputProj,
  OutputBias,
  QueryNorm,
  KeyNorm,
  QueryDownProj,
  QueryDownNorm,
  QueryUpProj,
  KvDownProj,
  KvDownNorm,
  KvUpProj,
  DenseGate,
  DenseUp,
  DenseDown,
  Router,
  RouterCorrectionBias,
  ExpertGate,
  ExpertUp,
  ExpertDown,
  ExpertGateUpFused,
  ExpertDownFused,
  SharedGate,
  SharedUp,
  SharedDown,
  SharedExpertGate,
};

/// Coarse groups of roles used for size reports.
enum class RoleGroup { Embedding, LmHead, Attention, Norms, DenseMlp, Router, RoutedExperts, SharedExperts };
constexpr int kNumRoleGroups = 8;

std::string_view tensorRoleName(TensorRole role);
/// The role named `name` (as tensorRoleName spells it), or nullopt.
std::optional<TensorRole> parseTensorRole(std::string_view name);
RoleGroup roleGroup(TensorRole role);
std::string_view roleGroupName(RoleGroup group);

/// A tensor the model expects on disk.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  TensorRole role;
  int64_t layer = -1;  ///< -1 for model-level tensors.
  int64_t expert = -1; ///< Routed expert, -1 otherwise (and for fused ones).
  /// A Linear weight: may be stored FP8 with a `_scale_inv` sibling.
  bool isLinearWeight = false;
};

/// The normalised description of a model.
struct ModelSpec {
  ModelFamily family = ModelFamily::Mixtral;
  std::string architecture; ///< config.json architectures[0].
  std::string modelType;    ///< config.json model_type.
  int64_t hiddenSize = 0;
  int64_t numLayers = 0;
  int64_t vocabSize = 0;
  int64_t maxPositions = 0;
  bool tieWordEmbeddings = false;
  bool lmHeadBias = false;
  NormKind normKind = NormKind::RmsNorm;
  double normEps = 1e-6;
  AttentionSpec attention;
  RopeSpec rope;
  RouterSpec router;
  std::vector<LayerSpec> layers;
  /// Element type the config declares (torch_dtype / dtype).
  DType configDType = DType::BF16;
  /// Linear weights stored FP8 with 128x128 block scales (DeepSeek-V3).
  bool fp8BlockScaled = false;
  /// Multi-token-prediction layers after the decoder (DeepSeek-V3); their
  /// tensors are not part of normal inference and are ignored.
  int64_t numMtpLayers = 0;

  /// Every tensor the model expects, in a stable order.
  std::vector<TensorSpec> tensors() const;
  int64_t numMoeLayers() const;

  /// Parses the text of a config.json; `source` names it in messages.
  static Expected<ModelSpec> fromConfigText(std::string_view text, const std::string &source);
  /// Reads and parses a config.json file.
  static Expected<ModelSpec> fromConfigFile(const std::string &path);
};

/// The architectures that ModelSpec supports, comma separated.
std::string supportedArchitectureList();

/// The name of the FP8 block-scale sibling of `weightName`.
std::string scaleInvName(const std::string &weightName);
/// Shape of the 128x128 block scales of a [rows, cols] weight.
std::vector<int64_t> fp8ScaleShape(const std::vector<int64_t> &weightShape);

/// What checking a checkpoint against its spec found besides errors.
struct CheckpointReport {
  std::vector<std::string> warnings;
  /// Tensors skipped on purpose (DeepSeek-V3 MTP layers).
  std::vector<std::string> ignoredTensors;
  /// FP8 `_scale_inv` tensors that belong to expected weights.
  std::vector<std::string> scaleTensors;
};

/// Detects each MoE layer's expert layout (per-expert or fused, and its
/// prefix) in `checkpoint`, records it in `spec`, then checks that every
/// expected tensor is present with the right shape and a usable dtype.
/// Unexpected extra tensors become warnings.
Expected<CheckpointReport> bindCheckpoint(ModelSpec &spec, const Checkpoint &checkpoint);

} // namespace moe

#endif // MOE_FRONTEND_MODELSPEC_H
