//===- BitAllocation.h - Bits per unit under a budget, as an ILP -*- C++ -*-===//
//
// Part of moec. Internal to the passes: the integer program of MC-MoE's
// bit allocation, solved with GLPK: pick one candidate width per unit,
// minimising the summed loss, with the parameter-weighted average width in
// [budget - tolerance, budget]. Pinned units keep their width and count in
// the budget.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_BITALLOCATION_H
#define MOE_PASSES_LIB_BITALLOCATION_H

#include "moe/Support/Status.h"

#include <vector>

namespace moe {

struct AllocationUnit {
  int64_t parameters = 0;
  std::vector<double> loss; ///< One per candidate width.
  int pinnedBits = 0;       ///< Nonzero: this width, whatever the loss.
};

struct Allocation {
  std::vector<int> bits;  ///< Per unit.
  double averageBits = 0; ///< Parameter-weighted.
  double loss = 0;
  /// False when GLPK stopped at its time limit: the allocation meets the
  /// budget but is the best found, not proven the best.
  bool proven = true;
};

/// Solves the allocation: the average lands in [budgetBits - tolerance,
/// budgetBits] (tolerance 0: exactly the budget). Fails, naming the closest
/// feasible budget(s), when the narrowest candidates (and the pins) exceed
/// the budget, the widest fall short of it, or no combination lands in the
/// window. GLPK searches for at most `timeLimitMs`; past it the best
/// allocation found stands (`proven` false), and when none was found yet
/// the error says so rather than calling the budget infeasible.
Expected<Allocation> allocateBits(const std::vector<AllocationUnit> &units, const std::vector<int> &candidates,
                                  double budgetBits, double tolerance = 0.0, int timeLimitMs = 30000);

} // namespace moe

#endif // MOE_PASSES_LIB_BITALLOCATION_H
