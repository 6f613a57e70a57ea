//===- Clustering.h - Neuron similarity and clustering ----------*- C++ -*-===//
//
// Part of moec. Internal to the passes: cosine similarity of neuron
// vectors and DERN's weighted spherical k-means.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_PASSES_LIB_CLUSTERING_H
#define MOE_PASSES_LIB_CLUSTERING_H

#include <cstdint>
#include <vector>

namespace moe {

/// Cosine of the angle between `a` and `b` (0 when either is zero).
double cosine(const std::vector<double> &a, const std::vector<double> &b);

/// A neuron (gate row, up row, down column) with its weight in a merge.
struct Segment {
  std::vector<double> vector;
  double weight = 0;
};

/// DERN's merge inside one expert: `members` clustered into `clusters`
/// neurons by weighted spherical k-means (cosine assignment). Centroids
/// start at the members with the largest max |gate| (the first `hidden`
/// values of each vector are its gate row; ties: the first member);
/// a centroid is the weighted mean direction of its members, each
/// normalised first so that large norms do not dominate, scaled to their
/// weighted mean norm; an empty cluster keeps its centroid. Stops when no
/// member moves (at most 20 rounds). At most members.size() clusters.
std::vector<std::vector<double>> sphericalKMeans(const std::vector<Segment> &members, int64_t clusters, int64_t hidden);

} // namespace moe

#endif // MOE_PASSES_LIB_CLUSTERING_H
