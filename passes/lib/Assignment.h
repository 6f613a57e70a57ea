//===- Assignment.h - Linear assignment (Hungarian method) ------*- C++ -*-===//
//
// Part of moec. Internal to the passes: neuron permutation alignment of
// experts before merging (M-SMoE).
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_ASSIGNMENT_H
#define MOE_PASSES_LIB_ASSIGNMENT_H

#include <cstdint>
#include <vector>

namespace moe {

/// For an n x n row-major `cost` matrix, the assignment row -> column of
/// minimum total cost (Kuhn-Munkres with potentials, O(n^3)).
std::vector<int64_t> solveAssignment(const std::vector<double> &cost, int64_t n);

} // namespace moe

#endif // MOE_PASSES_LIB_ASSIGNMENT_H
