//===- Router.h - Expert selection of every router kind ---------*- C++ -*-===//
//
// Part of moec. Internal to the runtime.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_LIB_ROUTER_H
#define MOE_RUNTIME_LIB_ROUTER_H

#include "common/Routing.h"
#include "moe/Frontend/ModelSpec.h"

#include <cstdint>

namespace moe::router {

/// The CPU's policy for kernels/common/Routing.h: the engine's vectorised
/// softmax and its sigmoid, one thread.
struct CpuMath {
  void softmax(float *x, int32_t count) const;
  float sigmoid(float x) const;
  void topK(const float *values, int32_t count, int32_t k, int32_t *taken, int32_t *out) const {
    routing::serialTopK(values, count, k, taken, out);
  }
  void sync() const {}
};

/// `router` over `numExperts` rows as the plain numbers of
/// kernels/common/Routing.h (what the CUDA decode's router reads).
routing::RouterParams params(const RouterSpec &router, int64_t numExperts);

/// Chooses router.topK experts of `numExperts` for one token from its router
/// `logits`, with the family's scoring, group limits, correction bias (null
/// when absent), renormalisation and scaling. Writes expert ids and weights.
void route(const RouterSpec &router, int64_t numExperts, const float *logits, const float *correctionBias,
           int32_t *chosen, float *weights);

/// NAEE's dynamic skipping (`threshold` > 0, K > 1): zeroes every weight
/// below threshold times the largest and rescales the rest to the old sum.
void skipWeakChoices(double threshold, int64_t K, float *weights);

/// The backward of route for one token: the gradient of a loss with respect
/// to the `logits` (written to logitGradients[numExperts]) from its
/// gradient with respect to the K weights route gave for `chosen`. The
/// choices are piecewise constant in the logits (top-k, groups, correction
/// bias, sparsemixer's sets), so only the weights carry a gradient, as in
/// autograd through the transformers routers.
void routeBackward(const RouterSpec &router, int64_t numExperts, const float *logits, const int32_t *chosen,
                   const float *weightGradients, float *logitGradients);

/// The backward of skipWeakChoices: from the gradient with respect to the
/// weights after skipping to that before, given the weights before.
void skipWeakChoicesBackward(double threshold, int64_t K, const float *weights, const float *skippedGradients,
                             float *weightGradients);

} // namespace moe::router

#endif // MOE_RUNTIME_LIB_ROUTER_H
