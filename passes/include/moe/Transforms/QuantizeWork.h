//===- QuantizeWork.h - What moe-quantize will compute, from shapes -*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_TRANSFORMS_QUANTIZEWORK_H
#define MOE_TRANSFORMS_QUANTIZEWORK_H

#include "moe/Dialect/Moe/IR/MoeOps.h"
#include "moe/Transforms/PassOptions.h"

#include "llvm/ADT/ArrayRef.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace moe {

/// moe-quantize's work in one decoder layer, estimated from the module's
/// shapes alone (so every process of a distributed run computes the same),
/// in the units of GPTQ's arithmetic: rows x columns^2 per matrix, plus
/// columns^3 once per Hessian factorisation (one serves the matrices that
/// read the same Hessian); rows x columns where GPTQ has no Hessian or the
/// method is RTN. Routed experts are assumed to get GPTQ (an expert below
/// min-coverage gets RTN, which is known only after calibration).
struct QuantizeWork {
  /// Each routed expert's cost, by slot (0 for slots with nothing to quantise).
  std::vector<double> expertCost;
  double expertLongest = 0; ///< The costliest single matrix of a routed expert.
  /// moe-quantize{shares=N}: the cost of each share of the layer's matrices
  /// outside routed experts (attention, shared experts, dense MLPs), and
  /// each share's costliest single matrix.
  std::vector<double> shareCost, shareLongest;
  /// A matrix outside routed experts that GPTQ runs on (it has its
  /// Hessian), the share it falls to, and the layer statistic its Hessian
  /// is (stats::kAttentionInputMoments and the like: what calibration must
  /// record for that share).
  struct Matrix {
    int64_t rows = 0, cols = 0, share = 0;
    std::string statistic;
  };
  std::vector<Matrix> gptqOutsideExperts;
};

/// moe-quantize{targets=`targets`} (empty: routed experts) on layer
/// `layer`, with GPTQ or not, split into `shares` shares.
QuantizeWork estimateQuantizeWork(ir::ModelOp model, llvm::ArrayRef<QuantizeTarget> targets, bool gptq, int64_t layer,
                                  int64_t shares);

/// A distributed run's split of the layer's routed experts over `ranks`
/// processes, rank r also quantising share r of the matrices outside them:
/// consecutive slots, rank r's from bounds[r] to bounds[r + 1], at least one
/// each, that make the largest rank's work (its share's and its experts'
/// estimated cost) least. A rank holding a long matrix (DeepSeek-V3's
/// o_proj, about eight experts' GPTQ on one thread) so gets fewer experts.
/// A rank's time with T threads is its work over T, but no less than its
/// longest matrix, which no split can shorten: the split that balances work
/// also makes the slowest rank's time least, whatever T (and every rank
/// computes the same, whatever its own --threads). Empty when there are
/// fewer slots than ranks.
std::vector<int64_t> splitExpertsOverRanks(const QuantizeWork &work, int64_t ranks);

} // namespace moe

#endif // MOE_TRANSFORMS_QUANTIZEWORK_H
