//===- Assignment.cpp - Linear assignment (Hungarian method) --------------===//
//
// Part of moec. The shortest-augmenting-path form of the Hungarian method
// with row and column potentials: each row is added by a Dijkstra-like scan
// over reduced costs, so the whole solve is O(n^3).
//
//===----------------------------------------------------------------------===//

#include "Assignment.h"

#include <cstddef>
#include <limits>

namespace moe {

std::vector<int64_t> solveAssignment(const std::vector<double> &cost, int64_t n) {
  const double infinity = std::numeric_limits<double>::infinity();
  // 1-based arrays; column 0 is a virtual start.
  std::vector<double> rowPotential(static_cast<std::size_t>(n + 1), 0),
      columnPotential(static_cast<std::size_t>(n + 1), 0);
  std::vector<int64_t> rowOfColumn(static_cast<std::size_t>(n + 1), 0), previous(static_cast<std::size_t>(n + 1), 0);
  for (int64_t row = 1; row <= n; ++row) {
    rowOfColumn[0] = row;
    int64_t column = 0;
    std::vector<double> slack(static_cast<std::size_t>(n + 1), infinity);
    std::vector<bool> used(static_cast<std::size_t>(n + 1), false);
    do {
      used[column] = true;
      const int64_t r = rowOfColumn[column];
      double delta = infinity;
      int64_t next = 0;
      for (int64_t c = 1; c <= n; ++c) {
        if (used[c])
          continue;
        double reduced = cost[(r - 1) * n + (c - 1)] - rowPotential[r] - columnPotential[c];
        if (reduced < slack[c]) {
          slack[c] = reduced;
          previous[c] = column;
        }
        if (slack[c] < delta) {
          delta = slack[c];
          next = c;
        }
      }
      for (int64_t c = 0; c <= n; ++c) {
        if (used[c]) {
          rowPotential[rowOfColumn[c]] += delta;
          columnPotential[c] -= delta;
        } else {
          slack[c] -= delta;
        }
      }
      column = next;
    } while (rowOfColumn[column] != 0);
    do {
      int64_t before = previous[column];
      rowOfColumn[column] = rowOfColumn[before];
      column = before;
    } while (column != 0);
  }
  std::vector<int64_t> assignment(static_cast<std::size_t>(n), -1);
  for (int64_t c = 1; c <= n; ++c)
    if (rowOfColumn[c] > 0)
      assignment[static_cast<std::size_t>(rowOfColumn[c] - 1)] = c - 1;
  return assignment;
}

} // namespace moe
