//===- ExpertMix.h - Experts as weighted sums of a layer's experts -*- C++ -*-===//
//
// Part of moec. EEP's expert merging: expert j of a layer becomes
// sum_i c_ji x expert i (gate, up and down alike). `moe-mix-experts` applies
// a mix to a module; `moec search` scores candidate mixes on the engine.
// Both compute a mixed matrix with mixMatrix, so the search's candidate and
// the pass's tensor hold the same values.
//
// Text form (the pass option, and what a search's recipe writes):
// "layer:target=c*source|c*source,target=...;layer:...", e.g.
// "1:0=0.94*0|0.06*5,2=1.01*2;3:4=0.5*4|0.5*7" (expert ids as the layer has
// them before the pass; a target not listed keeps its weights).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_TRANSFORMS_EXPERTMIX_H
#define MOE_TRANSFORMS_EXPERTMIX_H

#include "moe/Support/Status.h"

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

struct ExpertMixTerm {
  int64_t source = 0;
  float coefficient = 0;
  bool operator==(const ExpertMixTerm &) const = default;
};

/// Per layer, per target expert, its terms (sources distinct, in order).
using ExpertMixes = std::map<int64_t, std::map<int64_t, std::vector<ExpertMixTerm>>>;

/// Parses the text form; errors quote the part that is wrong.
Expected<ExpertMixes> parseExpertMixes(std::string_view text);

/// The text form, coefficients written so they parse back to the same floats.
std::string formatExpertMixes(const ExpertMixes &mixes);

/// out[i] = sum over t of terms[t].coefficient x sources[t][i], added in
/// the terms' order (every source as long as `out`).
void mixMatrix(std::span<const ExpertMixTerm> terms, std::span<const std::span<const float>> sources,
               std::span<float> out);

} // namespace moe

#endif // MOE_TRANSFORMS_EXPERTMIX_H
