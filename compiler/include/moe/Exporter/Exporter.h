//===- Exporter.h - moe module to a Hugging Face checkpoint -----*- C++ -*-===//
//
// Part of moec. Writes a standard checkpoint other runtimes load: every
// tensor of the module (copied from its source checkpoint or the
// WeightStore) under its Hugging Face name, experts renumbered as in the IR,
// config.json updated, tokenizer files copied.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_EXPORTER_EXPORTER_H
#define MOE_EXPORTER_EXPORTER_H

#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Frontend/ModelSpec.h"
#include "moe/Support/Status.h"

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace moe {

/// The config.json keys of a family's routed-expert count and width.
std::pair<const char *, const char *> configExpertKeys(ModelFamily family, const nlohmann::json &config);

/// How quantised tensors are written.
enum class QuantizedWeights {
  /// As the bf16 values their codes stand for (transformers reads no moec
  /// format), each with a line in `remarks`.
  Dequantized,
  /// As compressed-tensors' "pack-quantized" weights (vLLM, transformers),
  /// with its quantization_config in config.json; unquantised Linear
  /// modules (lm_head, routers) are listed in its "ignore".
  CompressedTensors,
};

/// Exports `model` to `directory` (created). Fails with a message naming
/// the layer when the result cannot be expressed in the family's
/// config.json (e.g. different expert counts or widths per layer).
Status exportHuggingFace(ir::ModelOp model, const std::string &directory, std::vector<std::string> *remarks = nullptr,
                         QuantizedWeights quantized = QuantizedWeights::Dequantized);

} // namespace moe

#endif // MOE_EXPORTER_EXPORTER_H
