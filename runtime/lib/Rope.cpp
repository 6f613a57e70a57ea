//===- Rope.cpp - Rotary position embeddings ------------------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "Rope.h"

#include <algorithm>
#include <cmath>

namespace moe::rope {
namespace {

double yarnMscale(double factor, double mscale) { return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0; }

/// Inverse frequencies (f32, as transformers computes them) and the factor
/// that multiplies cos/sin, for a forward whose largest position is
/// `maxPosition`.
void frequencies(const ModelSpec &spec, int64_t maxPosition, std::vector<float> &inverse, double &attentionFactor) {
  const RopeSpec &rope = spec.rope;
  const int64_t dim = rope.rotaryDim, half = dim / 2;
  inverse.assign(static_cast<size_t>(half), 0.0f);
  attentionFactor = 1.0;
  auto basePower = [&](int64_t i) {
    return std::pow(rope.theta, static_cast<double>(2 * i) / static_cast<double>(dim));
  };
  switch (rope.scaling) {
  case RopeScalingKind::None:
  case RopeScalingKind::Dynamic: // equals default up to the original length
    for (int64_t i = 0; i < half; ++i)
      inverse[i] = static_cast<float>(1.0 / basePower(i));
    break;
  case RopeScalingKind::Linear:
    for (int64_t i = 0; i < half; ++i)
      inverse[i] = static_cast<float>(1.0 / basePower(i) / rope.factor);
    break;
  case RopeScalingKind::Yarn: {
    auto correctionDim = [&](double rotations) {
      return dim * std::log(rope.originalMaxPositions / (rotations * 2.0 * M_PI)) / (2.0 * std::log(rope.theta));
    };
    double low = correctionDim(rope.betaFast), high = correctionDim(rope.betaSlow);
    if (rope.truncate) {
      low = std::floor(low);
      high = std::ceil(high);
    }
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim - 1));
    if (low == high)
      high += 0.001;
    for (int64_t i = 0; i < half; ++i) {
      double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
      double extrapolation = 1.0 / basePower(i);
      double interpolation = extrapolation / rope.factor;
      inverse[i] = static_cast<float>(interpolation * ramp + extrapolation * (1.0 - ramp));
    }
    // transformers: mscale/mscale_all_dim ratio when both are set, else
    // the plain YaRN magnitude.
    attentionFactor = rope.mscale != 0.0 && rope.mscaleAllDim != 0.0
                          ? yarnMscale(rope.factor, rope.mscale) / yarnMscale(rope.factor, rope.mscaleAllDim)
                          : yarnMscale(rope.factor, 1.0);
    break;
  }
  case RopeScalingKind::LongRope: {
    bool isLong = maxPosition + 1 > rope.originalMaxPositions;
    const std::vector<double> &extension = isLong ? rope.longFactor : rope.shortFactor;
    for (int64_t i = 0; i < half; ++i)
      inverse[i] = static_cast<float>(1.0 / (extension[i] * basePower(i)));
    attentionFactor = isLong ? rope.longMscale : rope.shortMscale;
    break;
  }
  }
}

} // namespace

Angles computeAngles(const ModelSpec &spec, int64_t firstPosition, int64_t tokens) {
  std::vector<float> inverse;
  double factor = 1.0;
  frequencies(spec, firstPosition + tokens - 1, inverse, factor);
  Angles angles;
  angles.tokens = tokens;
  angles.half = static_cast<int64_t>(inverse.size());
  angles.cos.resize(static_cast<size_t>(tokens * angles.half));
  angles.sin.resize(angles.cos.size());
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < angles.half; ++i) {
      // f32 product like transformers' position_ids.float() @ inv_freq.
      float angle = static_cast<float>(firstPosition + t) * inverse[i];
      angles.cos[t * angles.half + i] = static_cast<float>(std::cos(angle) * factor);
      angles.sin[t * angles.half + i] = static_cast<float>(std::sin(angle) * factor);
    }
  return angles;
}

namespace {

/// Rotates pairs by the token's angles, or by their negatives (the
/// transpose: cos and sin scaled alike, so R^T is R with sin negated).
void rotate(float *x, RopeLayout layout, const Angles &angles, int64_t token, float sign) {
  const float *cos = angles.cos.data() + token * angles.half;
  const float *sin = angles.sin.data() + token * angles.half;
  const int64_t half = angles.half;
  if (layout == RopeLayout::Half) {
    for (int64_t i = 0; i < half; ++i) {
      float a = x[i], b = x[i + half], s = sign * sin[i];
      x[i] = a * cos[i] - b * s;
      x[i + half] = b * cos[i] + a * s;
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      float a = x[2 * i], b = x[2 * i + 1], s = sign * sin[i];
      x[2 * i] = a * cos[i] - b * s;
      x[2 * i + 1] = a * s + b * cos[i];
    }
  }
}

} // namespace

void apply(float *x, RopeLayout layout, const Angles &angles, int64_t token) { rotate(x, layout, angles, token, 1.0f); }

void applyTranspose(float *x, RopeLayout layout, const Angles &angles, int64_t token) {
  rotate(x, layout, angles, token, -1.0f);
}

} // namespace moe::rope
