//===- SyntheticCheckpoint.h - Tiny random checkpoints for tests -*- C++ -*-===//
//
// Part of moec. Writes tiny random-weight checkpoints with the exact tensor
// names, shapes and dtypes of each supported family, so every family is
// tested without downloads. The weights are random: these files test
// formats and plumbing, never model quality.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_FRONTEND_SYNTHETICCHECKPOINT_H
#define MOE_FRONTEND_SYNTHETICCHECKPOINT_H

#include "moe/Frontend/ModelSpec.h"

#include <string>
#include <vector>

namespace moe {

struct SyntheticOptions {
  ModelFamily family = ModelFamily::Mixtral;
  /// Routed experts stored one tensor per projection, or fused 3-D
  /// (transformers v5 names: "mlp.experts.gate_up_proj").
  ExpertLayout expertLayout = ExpertLayout::PerExpert;
  /// More than one writes model-XXXXX-of-YYYYY.safetensors shards and an index.
  int shards = 1;
  /// Linear weights in F8_E4M3 with 128x128 `_scale_inv` block scales
  /// (DeepSeek-V3 only; its dims are then larger than one block). In a
  /// sharded checkpoint each scale goes to a different shard than its weight.
  bool fp8 = false;
  /// Element type of the other tensors.
  DType dtype = DType::BF16;
  uint64_t seed = 1;
  /// Names of extra tensors (shape [4], F32) written beside the model's.
  std::vector<std::string> extraTensors;
  /// A config.json to use instead of the family's tiny one (real-model
  /// shapes for benchmarks); `family` is then taken from it.
  std::string configText;
};

/// The config.json text of the tiny model of `family`.
std::string syntheticConfigJson(ModelFamily family, bool fp8);

/// Parses a family name as printed by familyName() ("mixtral", ...).
std::optional<ModelFamily> parseFamilyName(std::string_view name);

/// Writes config.json and the weights into `directory` (created if needed).
Status writeSyntheticCheckpoint(const std::string &directory, const SyntheticOptions &options);

/// Nearest F8_E4M3 encoding of `value` (saturating at +-448).
uint8_t floatToFloat8E4M3(float value);

} // namespace moe

#endif // MOE_FRONTEND_SYNTHETICCHECKPOINT_H
