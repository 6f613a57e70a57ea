//===- BitAllocation.cpp - Bits per unit under a budget, as an ILP --------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "BitAllocation.h"

#include <glpk.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <optional>

namespace moe {

namespace {

/// One integer program over the free units: x[u][b] binary, one width per
/// unit, and the parameter-weighted average of free and pinned widths in
/// [lower, upper]. `coefficient(u, b)` is the objective, minimised.
/// Returns the chosen candidate index per free unit, or nothing when no
/// choice fits the bounds.
template <typename Objective>
Expected<std::optional<std::vector<int>>> solve(const std::vector<AllocationUnit> &units, const std::vector<int> &free,
                                                const std::vector<int> &candidates, double parameters,
                                                double pinnedAverage, double lower, double upper, Objective coefficient,
                                                int timeLimitMs, bool *stoppedEarly = nullptr) {
  std::unique_ptr<glp_prob, void (*)(glp_prob *)> problem(glp_create_prob(), glp_delete_prob);
  glp_prob *lp = problem.get();
  glp_set_obj_dir(lp, GLP_MIN);
  const int K = static_cast<int>(candidates.size());
  const int rows = static_cast<int>(free.size()) + 1, columns = static_cast<int>(free.size()) * K;
  glp_add_rows(lp, rows);
  glp_add_cols(lp, columns);
  std::vector<int> ia(1), ja(1);
  std::vector<double> ar(1);
  for (int i = 0; i < static_cast<int>(free.size()); ++i) {
    glp_set_row_bnds(lp, i + 1, GLP_FX, 1.0, 1.0);
    for (int b = 0; b < K; ++b) {
      const int column = i * K + b + 1;
      glp_set_col_kind(lp, column, GLP_BV);
      glp_set_obj_coef(lp, column, coefficient(free[i], b));
      ia.push_back(i + 1), ja.push_back(column), ar.push_back(1.0);
      ia.push_back(rows), ja.push_back(column),
          ar.push_back(static_cast<double>(units[free[i]].parameters) * candidates[b] / parameters);
    }
  }
  // Round-off slack of 1e-9 bits on both sides: "exactly" means equal to
  // the printed digits.
  const double low = lower - pinnedAverage - 1e-9, high = upper - pinnedAverage + 1e-9;
  glp_set_row_bnds(lp, rows, low < high ? GLP_DB : GLP_FX, low, high);
  glp_load_matrix(lp, static_cast<int>(ia.size()) - 1, ia.data(), ja.data(), ar.data());
  glp_iocp control;
  glp_init_iocp(&control);
  control.presolve = GLP_ON;
  control.msg_lev = GLP_MSG_OFF;
  // Branch and bound can take long to prove that no combination exists;
  // past the limit the best combination found so far stands, said so.
  control.tm_lim = timeLimitMs;
  const int status = glp_intopt(lp, &control);
  if (status == GLP_ETMLIM && glp_mip_status(lp) != GLP_FEAS && glp_mip_status(lp) != GLP_OPT)
    return Status::error("bit allocation: GLPK reached its time limit (", timeLimitMs / 1000.0,
                         " s) before finding any allocation; none is proven impossible (fewer units, e.g. "
                         "granularity=expert, or a tolerance make the problem easier)");
  if (status == GLP_ENOPFS || status == GLP_ENODFS || glp_mip_status(lp) == GLP_NOFEAS)
    return std::optional<std::vector<int>>();
  if (stoppedEarly)
    *stoppedEarly = status == GLP_ETMLIM;
  if ((status != 0 && status != GLP_ETMLIM) || (glp_mip_status(lp) != GLP_OPT && glp_mip_status(lp) != GLP_FEAS))
    return Status::error("bit allocation: GLPK found no solution (status ", status, ")");
  std::vector<int> chosen(free.size(), 0);
  for (int i = 0; i < static_cast<int>(free.size()); ++i)
    for (int b = 0; b < K; ++b)
      if (glp_mip_col_val(lp, i * K + b + 1) > 0.5)
        chosen[static_cast<size_t>(i)] = b;
  return std::optional<std::vector<int>>(std::move(chosen));
}

} // namespace

Expected<Allocation> allocateBits(const std::vector<AllocationUnit> &units, const std::vector<int> &candidates,
                                  double budgetBits, double tolerance, int timeLimitMs) {
  if (units.empty())
    return Status::error("bit allocation: no units to allocate");
  if (candidates.empty())
    return Status::error("bit allocation: no candidate widths");
  if (!(tolerance >= 0) || !std::isfinite(tolerance))
    return Status::error("bit allocation: the tolerance must not be negative, got ", tolerance);
  if (!std::isfinite(budgetBits) || !(budgetBits > 0))
    return Status::error("bit allocation: the budget must be a positive number of bits per weight, got ", budgetBits);
  const int narrowest = *std::min_element(candidates.begin(), candidates.end());
  const int widest = *std::max_element(candidates.begin(), candidates.end());
  double parameters = 0, minimum = 0, maximum = 0, pinnedBits = 0;
  std::vector<int> free;
  for (size_t u = 0; u < units.size(); ++u) {
    const AllocationUnit &unit = units[u];
    if (!unit.pinnedBits && unit.loss.size() != candidates.size())
      return Status::error("bit allocation: a unit has ", unit.loss.size(), " losses for ", candidates.size(),
                           " candidates");
    const double p = static_cast<double>(unit.parameters);
    parameters += p;
    minimum += p * (unit.pinnedBits ? unit.pinnedBits : narrowest);
    maximum += p * (unit.pinnedBits ? unit.pinnedBits : widest);
    if (unit.pinnedBits)
      pinnedBits += p * unit.pinnedBits;
    else
      free.push_back(static_cast<int>(u));
  }
  minimum /= parameters;
  maximum /= parameters;
  const double lower = budgetBits - tolerance;
  if (minimum > budgetBits + 1e-9)
    return Status::error("bit allocation: a budget of ", budgetBits,
                         " bits per weight is infeasible; the closest "
                         "feasible budget is ",
                         minimum, " (every unit at its narrowest candidate or pinned width)");
  if (maximum < lower - 1e-9)
    return Status::error("bit allocation: a budget of ", budgetBits, " bits per weight (within ", tolerance,
                         ") is infeasible; the closest feasible budget is ", maximum,
                         " (every unit at its widest candidate or pinned width)");

  // Reachable totals (sum of parameters x bits) lie on a grid: the base
  // (narrowest widths and pins) plus multiples of gcd(parameters) x
  // gcd(width steps). The window snaps to it, so that an exact budget off
  // the grid fails at once (GLPK's branch and bound would search long to
  // prove it) and one on it has a right-hand side GLPK can meet.
  int64_t step = 0, widthStep = 0, base = 0, total = 0;
  for (const AllocationUnit &unit : units) {
    total += unit.parameters;
    base += unit.parameters * (unit.pinnedBits ? unit.pinnedBits : narrowest);
    if (!unit.pinnedBits)
      step = std::gcd(step, unit.parameters);
  }
  for (int c : candidates)
    widthStep = std::gcd(widthStep, static_cast<int64_t>(c - narrowest));
  step *= std::max<int64_t>(widthStep, 1);
  double upper = budgetBits;
  if (step > 0) {
    const double budgetTotal = budgetBits * static_cast<double>(total);
    const int64_t below =
        base + step * static_cast<int64_t>(
                          std::floor((budgetTotal - static_cast<double>(base)) / static_cast<double>(step) + 1e-9));
    upper = static_cast<double>(below) / static_cast<double>(total);
    if (upper < lower - 1e-9) {
      std::string closest = concat(upper);
      if (static_cast<double>(below + step) / static_cast<double>(total) <= maximum + 1e-9)
        closest += concat(" or ", static_cast<double>(below + step) / static_cast<double>(total));
      return Status::error("bit allocation: no choice of widths averages ", budgetBits, " bits per weight (within ",
                           tolerance, "); the closest feasible budgets are ", closest, " (or raise the tolerance)");
    }
  }

  Allocation allocation;
  allocation.bits.assign(units.size(), 0);
  for (size_t u = 0; u < units.size(); ++u)
    allocation.bits[u] = units[u].pinnedBits;
  if (!free.empty()) {
    // Loss scale: GLPK's tolerances are absolute, so normalise.
    double largest = 0;
    for (int u : free)
      for (double loss : units[u].loss)
        largest = std::max(largest, std::abs(loss));
    const double scale = largest > 0 ? 1.0 / largest : 1.0;
    const double pinnedAverage = pinnedBits / parameters;
    auto bitsOf = [&](int u, int b) { return static_cast<double>(units[u].parameters) * candidates[b] / parameters; };
    bool stoppedEarly = false;
    Expected<std::optional<std::vector<int>>> chosen = solve(
        units, free, candidates, parameters, pinnedAverage, lower, upper,
        [&](int u, int b) { return units[u].loss[b] * scale; }, timeLimitMs, &stoppedEarly);
    allocation.proven = !stoppedEarly;
    if (!chosen)
      return chosen.status();
    if (!*chosen) {
      // No choice lands in [budget - tolerance, budget]: name the closest
      // averages that can be met on either side.
      auto closest = [&](double low, double high, double sign) -> Expected<double> {
        Expected<std::optional<std::vector<int>>> extreme = solve(
            units, free, candidates, parameters, pinnedAverage, low, high,
            [&](int u, int b) { return sign * bitsOf(u, b); }, timeLimitMs);
        if (!extreme)
          return extreme.status();
        if (!*extreme)
          return -1.0;
        double average = pinnedAverage;
        for (size_t i = 0; i < free.size(); ++i)
          average += bitsOf(free[i], (**extreme)[i]);
        return average;
      };
      Expected<double> below = closest(minimum, upper, -1.0), above = closest(upper, maximum, 1.0);
      if (!below)
        return below.status();
      if (!above)
        return above.status();
      std::string options;
      if (*below >= 0)
        options += concat(*below);
      if (*above >= 0)
        options += concat(options.empty() ? "" : " or ", *above);
      return Status::error("bit allocation: no choice of widths averages ", budgetBits, " bits per weight (within ",
                           tolerance, "); the closest feasible budgets are ", options, " (or raise the tolerance)");
    }
    for (size_t i = 0; i < free.size(); ++i)
      allocation.bits[free[i]] = candidates[(**chosen)[i]];
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
