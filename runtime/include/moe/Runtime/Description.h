//===- Description.h - A model as the runtime executes it -------*- C++ -*-===//
//
// Part of moec. The in-memory description of a (compressed) model that the
// backend lowers a moe module to (DESIGN.md "Who may depend on whom"): the
// ModelSpec, where every tensor's bytes are (a source checkpoint file, a
// slice of a fused tensor, or the WeightStore), and per MoE layer the
// expert table (ids, widths that atomic pruning makes differ), the router
// (per-layer top-k and groups), the remap of router rows to experts that
// merging leaves, and the dynamic-skip threshold. The runtime executes it
// without knowing about MLIR.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_DESCRIPTION_H
#define MOE_RUNTIME_DESCRIPTION_H

#include "moe/Frontend/ModelSpec.h"
#include "moe/Runtime/Weights.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace moe {

/// Where one tensor's bytes are.
struct TensorRef {
  std::string name;            ///< For messages (the IR symbol).
  int64_t source = -1;         ///< Index into ModelDescription::sources; -1: the WeightStore.
  std::string key;             ///< Key in that file or store.
  std::vector<int64_t> slice;  ///< Empty, or {index, first row, rows, transposed} of a 3-D tensor.
  std::vector<int64_t> shape;  ///< The shape the model uses.
  std::string scaleKey;        ///< FP8 block scales (`<key>_scale_inv`), or empty.
  int64_t scaleSource = -1;    ///< The source holding them.
  std::string format;          ///< Quantisation format (QuantFormat::name()) of the stored bytes, or empty.
};

struct ExpertEntry {
  int64_t id = 0, width = 0;
  TensorRef gate, up, down;
};

struct LayerEntry {
  /// Every tensor of the layer but the routed experts, by role.
  std::vector<std::pair<TensorRole, TensorRef>> tensors;
  std::vector<ExpertEntry> experts; ///< In slot order; RoutingPlan::remap indexes slots.
  RoutingPlan routing;
};

struct ModelDescription {
  ModelSpec spec;
  std::vector<std::string> sources; ///< Safetensors files, absolute or relative to the process.
  std::string store;                ///< WeightStore path, or empty.
  std::string assetDirectory;       ///< Where tokenizer.json etc. are (the first source's directory).
  std::vector<std::pair<TensorRole, TensorRef>> globals;
  std::vector<LayerEntry> layers;   ///< One per decoder layer.
  /// Run quantised tensors as their dequantised f32 values (the simulated
  /// model) instead of through the integer kernels.
  bool dequantizeQuantized = false;
};

/// Reads the tensors of `description` (every float dtype, FP8 with block
/// scales, slices, WeightStore records), checking each against its shape.
std::unique_ptr<WeightProvider> makeDescriptionWeightProvider(ModelDescription description);

} // namespace moe

#endif // MOE_RUNTIME_DESCRIPTION_H
