//===- DescriptionSummary.h - What a compiled model holds -------*- C++ -*-===//
//
// Part of moec. The facts `moec inspect` shows of a module, a package or a
// GGUF file moec wrote, from the ModelDescription the runtime would run:
// per MoE layer the expert table (id, width, the format of each matrix and
// its bytes), the router (top-k, remap of merged experts, skip threshold),
// and over the model the bytes by role group and by format.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_DESCRIPTIONSUMMARY_H
#define MOE_RUNTIME_DESCRIPTIONSUMMARY_H

#include "moe/Runtime/Description.h"

#include <nlohmann/json.hpp>

namespace moe {

/// The summary as JSON: {"family", "layers": [{"index", "mlp", "top_k",
/// "experts": [{"id", "width", "formats": [gate, up, down], "bytes"}],
/// "remap", "skip_threshold", "bytes"}], "bytes_by_role": {...},
/// "bytes_by_format": {...}, "bytes"}. Formats of unquantised tensors are
/// their dtypes ("bf16").
Expected<nlohmann::json> summarizeDescription(const ModelDescription &description);

} // namespace moe

#endif // MOE_RUNTIME_DESCRIPTIONSUMMARY_H
