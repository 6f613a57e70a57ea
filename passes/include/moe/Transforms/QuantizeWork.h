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
  /// The matrices outside routed experts that GPTQ runs on (it has their
  /// Hessians): rows, columns.
  std::vector<std::pair<int64_t, int64_t>> gptqOutsideExperts;
};

/// moe-quantize{targets=`targets`} (empty: routed experts) on layer
/// `layer`, with GPTQ or not, split into `shares` shares.
QuantizeWork estimateQuantizeWork(ir::ModelOp model, llvm::ArrayRef<QuantizeTarget> targets, bool gptq, int64_t layer,
                                  int64_t shares);

} // namespace moe

#endif // MOE_TRANSFORMS_QUANTIZEWORK_H
