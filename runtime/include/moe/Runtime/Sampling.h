//===- Sampling.h - The next token from logits ------------------*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_RUNTIME_SAMPLING_H
#define MOE_RUNTIME_SAMPLING_H

#include "moe/Support/Status.h"

#include <cstdint>
#include <random>

namespace moe {

struct SamplingOptions {
  double temperature = 0.0; ///< 0: greedy.
  int64_t topK = 0;         ///< 0: the whole vocabulary.
};

/// Greedy (temperature 0) or seeded sampling from softmax(logits / T)
/// restricted to the top k; the same seed gives the same tokens on every
/// platform (uniform draws from 53 random bits). A NaN or infinite logit
/// is an error (a broken model), never a token drawn from it.
Expected<int32_t> sampleToken(const float *logits, int64_t vocab, const SamplingOptions &options, std::mt19937_64 &rng);

} // namespace moe

#endif // MOE_RUNTIME_SAMPLING_H
