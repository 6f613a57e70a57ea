//===- BitAllocation.cpp - Bits per unit under a budget, as an ILP --------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "BitAllocation.h"

#include <glpk.h>

#include <algorithm>
#include <memory>

namespace moe {

Expected<Allocation> allocateBits(const std::vector<AllocationUnit> &units, const std::vector<int> &candidates,
                                  double budgetBits) {
  if (units.empty())
    return Status::error("bit allocation: no units to allocate");
  if (candidates.empty())
    return Status::error("bit allocation: no candidate widths");
  const int narrowest = *std::min_element(candidates.begin(), candidates.end());
  double parameters = 0, minimum = 0;
  for (const AllocationUnit &unit : units) {
    if (!unit.pinnedBits && unit.loss.size() != candidates.size())
      return Status::error("bit allocation: a unit has ", unit.loss.size(), " losses for ", candidates.size(),
                           " candidates");
    parameters += static_cast<double>(unit.parameters);
    minimum += static_cast<double>(unit.parameters) * (unit.pinnedBits ? unit.pinnedBits : narrowest);
  }
  const double closest = minimum / parameters;
  if (closest > budgetBits + 1e-9)
    return Status::error("bit allocation: a budget of ", budgetBits, " bits per weight is infeasible; the closest "
                         "feasible budget is ", closest, " (every unit at its narrowest candidate or pinned width)");

  // Columns: x[u][b] binary for unpinned units. Rows: one choice per unit,
  // and the budget sum(bits * params * x) <= budget * params - pinned bits.
  std::unique_ptr<glp_prob, void (*)(glp_prob *)> problem(glp_create_prob(), glp_delete_prob);
  glp_prob *lp = problem.get();
  glp_set_obj_dir(lp, GLP_MIN);
  std::vector<int> free;
  double pinnedBits = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    if (units[u].pinnedBits)
      pinnedBits += static_cast<double>(units[u].parameters) * units[u].pinnedBits;
    else
      free.push_back(static_cast<int>(u));
  }
  const int K = static_cast<int>(candidates.size());
  const int rows = static_cast<int>(free.size()) + 1, columns = static_cast<int>(free.size()) * K;
  Allocation allocation;
  allocation.bits.assign(units.size(), 0);
  for (size_t u = 0; u < units.size(); ++u)
    allocation.bits[u] = units[u].pinnedBits;
  if (!free.empty()) {
    glp_add_rows(lp, rows);
    glp_add_cols(lp, columns);
    std::vector<int> ia(1), ja(1);
    std::vector<double> ar(1);
    // Loss scale: GLPK's tolerances are absolute, so normalise.
    double largest = 0;
    for (int u : free)
      for (double loss : units[u].loss)
        largest = std::max(largest, std::abs(loss));
    const double scale = largest > 0 ? 1.0 / largest : 1.0;
    for (int i = 0; i < static_cast<int>(free.size()); ++i) {
      glp_set_row_bnds(lp, i + 1, GLP_FX, 1.0, 1.0);
      for (int b = 0; b < K; ++b) {
        const int column = i * K + b + 1;
        glp_set_col_kind(lp, column, GLP_BV);
        glp_set_obj_coef(lp, column, units[free[i]].loss[b] * scale);
        ia.push_back(i + 1), ja.push_back(column), ar.push_back(1.0);
        ia.push_back(rows), ja.push_back(column),
            ar.push_back(static_cast<double>(units[free[i]].parameters) * candidates[b] / parameters);
      }
    }
    glp_set_row_bnds(lp, rows, GLP_UP, 0.0, budgetBits - pinnedBits / parameters + 1e-12);
    glp_load_matrix(lp, static_cast<int>(ia.size()) - 1, ia.data(), ja.data(), ar.data());
    glp_iocp control;
    glp_init_iocp(&control);
    control.presolve = GLP_ON;
    control.msg_lev = GLP_MSG_OFF;
    const int status = glp_intopt(lp, &control);
    if (status != 0 || (glp_mip_status(lp) != GLP_OPT && glp_mip_status(lp) != GLP_FEAS))
      return Status::error("bit allocation: GLPK found no solution (status ", status, ")");
    for (int i = 0; i < static_cast<int>(free.size()); ++i)
      for (int b = 0; b < K; ++b)
        if (glp_mip_col_val(lp, i * K + b + 1) > 0.5)
          allocation.bits[free[i]] = candidates[b];
  }
  double bits = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    bits += static_cast<double>(units[u].parameters) * allocation.bits[u];
    if (!units[u].pinnedBits) {
      const size_t b = std::find(candidates.begin(), candidates.end(), allocation.bits[u]) - candidates.begin();
      allocation.loss += units[u].loss[b];
    }
  }
  allocation.averageBits = bits / parameters;
  return allocation;
}

} // namespace moe
