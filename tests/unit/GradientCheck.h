//===- GradientCheck.h - Finite differences of the engine's loss -*- C++ -*-===//
//
// Part of moec. Shared by the unit and compiler tests of the backward pass.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_TESTS_UNIT_GRADIENTCHECK_H
#define MOE_TESTS_UNIT_GRADIENTCHECK_H

#include "moe/Runtime/Engine.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

namespace moe::testing {

/// The input-embedding gradient of Engine::lossGradients.
class InputGradient : public GradientObserver {
public:
  std::vector<float> input;
  void onInputGradient(int64_t, std::span<const float> gradient) override {
    input.assign(gradient.begin(), gradient.end());
  }
};

/// <gradient, d> against (L(x + e d) - L(x - e d)) / 2e along random
/// directions d over the input embeddings.
inline void expectFiniteDifferencesAgree(Engine &engine, const std::vector<int32_t> &ids, const std::string &what) {
  std::vector<float> x;
  ASSERT_TRUE(engine.embed(ids, x).ok());
  InputGradient recorder;
  Expected<double> loss = engine.lossGradients(ids, recorder, x);
  ASSERT_TRUE(loss.ok()) << loss.status().message();
  std::mt19937 random(7);
  std::normal_distribution<float> normal;
  int agreed = 0;
  const int directions = 6;
  for (int trial = 0; trial < directions; ++trial) {
    std::vector<float> d(x.size());
    for (float &value : d)
      value = normal(random);
    double analytic = 0;
    for (size_t i = 0; i < d.size(); ++i)
      analytic += static_cast<double>(recorder.input[i]) * d[i];
    // Steps of small fractions of the embeddings' own size; a step that
    // crosses a top-k tie or a clamp makes a jump, so the smallest that
    // agrees counts.
    double xNorm = 0, dNorm = 0;
    for (size_t i = 0; i < d.size(); ++i) {
      xNorm += static_cast<double>(x[i]) * x[i];
      dNorm += static_cast<double>(d[i]) * d[i];
    }
    bool agrees = false;
    std::string seen;
    for (double relativeStep : {1e-3, 3e-4, 1e-4}) {
      const double step = relativeStep * std::sqrt(xNorm / dNorm);
      std::vector<float> plus(x), minus(x);
      for (size_t i = 0; i < d.size(); ++i) {
        plus[i] += static_cast<float>(step) * d[i];
        minus[i] -= static_cast<float>(step) * d[i];
      }
      GradientObserver none;
      Expected<double> up = engine.lossGradients(ids, none, plus), down = engine.lossGradients(ids, none, minus);
      ASSERT_TRUE(up.ok() && down.ok());
      const double numeric = (*up - *down) / (2 * step);
      seen += " " + std::to_string(numeric);
      agrees = agrees || std::fabs(numeric - analytic) <= 1e-2 * std::max(std::fabs(analytic), 1.0);
    }
    if (agrees)
      ++agreed;
    if (std::getenv("MOEC_TEST_VERBOSE") || !agrees)
      std::cerr << what << " direction " << trial << ": gradient " << analytic << ", finite differences" << seen
                << "\n";
  }
  EXPECT_GE(agreed, directions - 1) << what;
}

} // namespace moe::testing

#endif // MOE_TESTS_UNIT_GRADIENTCHECK_H
