//===- GgufExport.h - A compressed model as a llama.cpp GGUF file -*- C++ -*-===//
//
// Part of moec. Writes what the runtime would execute (a ModelDescription,
// lowered from a module or read from a package) as a GGUF file llama.cpp
// loads: its architecture's tensor names (Mixtral as "llama" with Q/K rows
// permuted for its rope, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3 as
// "deepseek2", PhiMoE), experts stacked into 3-D tensors, hyperparameters
// and the BPE tokenizer. What compression did is carried over exactly where
// GGUF can hold it and refused with the reason where it cannot:
//   - atom-pruned experts are padded with zero neurons to the widest expert
//     (a zero neuron adds nothing);
//   - experts merged by M-SMoE are written into every member's router slot
//     (a merged expert run with its members' summed weight equals each
//     member run with its own), unless expandMerged is false;
//   - different expert counts per layer and dynamic skipping are refused;
//   - moec formats that coincide with a ggml type are converted losslessly
//     (4-bit sym -> Q4_0, 4-bit asym -> Q4_1, 8-bit sym -> Q8_0, fp16
//     scales, groups of 32/64/128: every 32 codes of a group are a block
//     with the group's header); the others, split experts, and a layer whose
//     experts have different formats are requantized to one ggml type per
//     tensor (from the source checkpoint's weights where the tensor is
//     unchanged there, else from the values its codes stand for), each
//     with a remark.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_EXPORTER_GGUFEXPORT_H
#define MOE_EXPORTER_GGUFEXPORT_H

#include "moe/Runtime/Description.h"
#include "moe/Support/Status.h"

#include <string>
#include <vector>

namespace moe {

struct GgufExportOptions {
  /// Write merged experts into each member's slot (else refuse them).
  bool expandMerged = true;
};

/// The files beside the weights: tokenizer.json, tokenizer_config.json
/// (both as text; the first is required).
struct GgufAssets {
  std::string tokenizerJson, tokenizerConfigJson;
};

/// The assets of a description lowered from a module (its source directory).
Expected<GgufAssets> readGgufAssets(const ModelDescription &description);

/// Writes `description` to `path`; `where` names the input in messages.
/// Each conversion that is not a byte copy adds a line to `remarks`.
Status exportGguf(const ModelDescription &description, const GgufAssets &assets, const std::string &where,
                  const std::string &path, const GgufExportOptions &options, std::vector<std::string> &remarks);

} // namespace moe

#endif // MOE_EXPORTER_GGUFEXPORT_H
