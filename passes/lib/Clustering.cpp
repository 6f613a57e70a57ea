//===- Clustering.cpp - Neuron similarity and clustering ------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Clustering.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moe {

double cosine(const std::vector<double> &a, const std::vector<double> &b) {
  double dot = 0, na = 0, nb = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na > 0 && nb > 0 ? dot / std::sqrt(na * nb) : 0.0;
}

std::vector<std::vector<double>> sphericalKMeans(const std::vector<Segment> &members, int64_t clusters,
                                                 int64_t hidden) {
  const size_t n = members.size();
  clusters = std::min<int64_t>(clusters, static_cast<int64_t>(n));
  if (clusters <= 0)
    return {};
  std::vector<double> norms(n), peaks(n, 0.0);
  for (size_t i = 0; i < n; ++i) {
    double square = 0;
    for (double value : members[i].vector)
      square += value * value;
    norms[i] = std::sqrt(square);
    for (int64_t h = 0; h < hidden; ++h)
      peaks[i] = std::max(peaks[i], std::fabs(members[i].vector[static_cast<size_t>(h)]));
  }
  std::vector<size_t> byPeak(n);
  std::iota(byPeak.begin(), byPeak.end(), 0);
  std::stable_sort(byPeak.begin(), byPeak.end(), [&](size_t a, size_t b) { return peaks[a] > peaks[b]; });
  std::vector<std::vector<double>> centroids;
  for (int64_t c = 0; c < clusters; ++c)
    centroids.push_back(members[byPeak[static_cast<size_t>(c)]].vector);
  std::vector<int64_t> assignment(n, -1);
  for (int round = 0; round < 20; ++round) {
    bool moved = false;
    for (size_t i = 0; i < n; ++i) {
      int64_t best = 0;
      double bestSimilarity = -2;
      for (int64_t c = 0; c < clusters; ++c) {
        const double similarity = cosine(members[i].vector, centroids[static_cast<size_t>(c)]);
        if (similarity > bestSimilarity) {
          bestSimilarity = similarity;
          best = c;
        }
      }
      moved |= assignment[i] != best;
      assignment[i] = best;
    }
    if (!moved)
      break;
    const size_t width = members.front().vector.size();
    std::vector<std::vector<double>> direction(static_cast<size_t>(clusters), std::vector<double>(width, 0.0));
    std::vector<double> weight(static_cast<size_t>(clusters), 0.0), norm(static_cast<size_t>(clusters), 0.0);
    for (size_t i = 0; i < n; ++i) {
      if (norms[i] == 0)
        continue;
      const size_t c = static_cast<size_t>(assignment[i]);
      const double w = members[i].weight;
      for (size_t k = 0; k < width; ++k)
        direction[c][k] += w * members[i].vector[k] / norms[i];
      weight[c] += w;
      norm[c] += w * norms[i];
    }
    for (size_t c = 0; c < static_cast<size_t>(clusters); ++c) {
      double length = 0;
      for (double value : direction[c])
        length += value * value;
      length = std::sqrt(length);
      if (weight[c] <= 0 || length == 0)
        continue; // an empty cluster keeps its centroid
      for (size_t k = 0; k < width; ++k)
        centroids[c][k] = direction[c][k] / length * (norm[c] / weight[c]);
    }
  }
  return centroids;
}

} // namespace moe
