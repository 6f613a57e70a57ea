//===- Router.h - Expert selection of every router kind ---------*- C++ -*-===//
//
// Part of moec. Internal to the runtime.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_LIB_ROUTER_H
#define MOE_RUNTIME_LIB_ROUTER_H

#include "moe/Frontend/ModelSpec.h"

#include <cstdint>

namespace moe::router {

/// Chooses router.topK experts of `numExperts` for one token from its router
/// `logits`, with the family's scoring, group limits, correction bias (null
/// when absent), renormalisation and scaling. Writes expert ids and weights.
void route(const RouterSpec &router, int64_t numExperts, const float *logits, const float *correctionBias,
           int32_t *chosen, float *weights);

/// NAEE's dynamic skipping (`threshold` > 0, K > 1): zeroes every weight
/// below threshold times the largest and rescales the rest to the old sum.
void skipWeakChoices(double threshold, int64_t K, float *weights);

} // namespace moe::router

#endif // MOE_RUNTIME_LIB_ROUTER_H
