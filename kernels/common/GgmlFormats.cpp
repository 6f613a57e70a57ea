//===- GgmlFormats.cpp - llama.cpp's block formats: scalar reference ------===//
//
// Part of moec. Compiled with -ffp-contract=off: the dequantization must
// round exactly as the Python gguf package's float32 arithmetic does.
//
//===----------------------------------------------------------------------===//

#include "common/GgmlFormats.h"
#include "common/QuantFormat.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace moe::quant {

const GgmlTraits kGgmlTraits[13] = {
    {GgmlType::Q4_0, "q4_0", "Q4_0", 32, 18, 4},   {GgmlType::Q4_1, "q4_1", "Q4_1", 32, 20, 4},
    {GgmlType::Q5_0, "q5_0", "Q5_0", 32, 22, 5},   {GgmlType::Q5_1, "q5_1", "Q5_1", 32, 24, 5},
    {GgmlType::Q8_0, "q8_0", "Q8_0", 32, 34, 8},   {GgmlType::Q2_K, "q2_k", "Q2_K", 256, 84, 2},
    {GgmlType::Q3_K, "q3_k", "Q3_K", 256, 110, 3}, {GgmlType::Q4_K, "q4_k", "Q4_K", 256, 144, 4},
    {GgmlType::Q5_K, "q5_k", "Q5_K", 256, 176, 5}, {GgmlType::Q6_K, "q6_k", "Q6_K", 256, 210, 6},
    {GgmlType::F32, "f32", "F32", 1, 4, 32},       {GgmlType::F16, "f16", "F16", 1, 2, 16},
    {GgmlType::BF16, "bf16", "BF16", 1, 2, 16},
};

std::optional<GgmlGroupLayout> ggmlGroupLayout(GgmlType type) {
  static_assert(sizeof(BlockQ4_0) == QuantFormat{4, 32, true}.groupBytes() &&
                    sizeof(BlockQ4_1) == QuantFormat{4, 32, false}.groupBytes() &&
                    sizeof(BlockQ8_0) == QuantFormat{8, 32, true}.groupBytes(),
                "the block formats' bytes are the group formats'");
  switch (type) {
  case GgmlType::Q4_0:
    return GgmlGroupLayout{{4, 32, true, ScaleType::F16}, false};
  case GgmlType::Q4_1:
    return GgmlGroupLayout{{4, 32, false, ScaleType::F16}, false};
  case GgmlType::Q8_0:
    return GgmlGroupLayout{{8, 32, true, ScaleType::F16}, true};
  default:
    return std::nullopt;
  }
}

const GgmlTraits *ggmlTraits(GgmlType type) {
  for (const GgmlTraits &traits : kGgmlTraits)
    if (traits.type == type)
      return &traits;
  return nullptr;
}

const GgmlTraits *ggmlBlockFormat(std::string_view name) {
  for (const GgmlTraits &traits : kGgmlTraits)
    if (isGgmlBlockFormat(traits.type) && name == traits.name)
      return &traits;
  return nullptr;
}

GgmlType ggmlTypeForBits(double bits, int64_t cols) {
  const bool k = cols % kSuperBlock == 0;
  if (bits <= 2.5)
    return k ? GgmlType::Q2_K : GgmlType::Q4_0;
  if (bits <= 3.5)
    return k ? GgmlType::Q3_K : GgmlType::Q4_0;
  if (bits <= 4.5)
    return k ? GgmlType::Q4_K : GgmlType::Q4_0;
  if (bits <= 5.5)
    return k ? GgmlType::Q5_K : GgmlType::Q5_0;
  if (bits <= 6.5)
    return k ? GgmlType::Q6_K : GgmlType::Q8_0;
  return GgmlType::Q8_0;
}

size_t ggmlRowBytes(GgmlType type, int64_t n) {
  const GgmlTraits *traits = ggmlTraits(type);
  return static_cast<size_t>(n / traits->blockSize) * static_cast<size_t>(traits->blockBytes);
}

namespace {

float half(uint16_t bits) { return scaleToFloat(bits, ScaleType::F16); }
uint16_t toHalf(float value) { return floatToScale(value, ScaleType::F16); }

/// Sub-block `j` (0..7) scale and min of Q4_K / Q5_K: 6 bits each in 12 bytes.
void scaleMinK4(const uint8_t *s, int j, int &scale, int &min) {
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
    min = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
  }
}
void setScaleMinK4(uint8_t *s, int j, int scale, int min) {
  if (j < 4) {
    s[j] = static_cast<uint8_t>((s[j] & 0xC0) | scale);
    s[j + 4] = static_cast<uint8_t>((s[j + 4] & 0xC0) | min);
  } else {
    s[j + 4] = static_cast<uint8_t>((scale & 0x0F) | ((min & 0x0F) << 4));
    s[j - 4] = static_cast<uint8_t>((s[j - 4] & 0x3F) | ((scale >> 4) << 6));
    s[j] = static_cast<uint8_t>((s[j] & 0x3F) | ((min >> 4) << 6));
  }
}

/// Sub-block `j` (0..15) scale of Q3_K, 6 bits (stored + 32).
int scaleQ3K(const uint8_t *s, int j) {
  const int low = j < 8 ? s[j] & 0x0F : s[j - 8] >> 4;
  const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
  return low | (high << 4);
}
void setScaleQ3K(uint8_t *s, int j, int stored) {
  if (j < 8)
    s[j] = static_cast<uint8_t>((s[j] & 0xF0) | (stored & 0x0F));
  else
    s[j - 8] = static_cast<uint8_t>((s[j - 8] & 0x0F) | ((stored & 0x0F) << 4));
  uint8_t &high = s[8 + j % 4];
  const int shift = 2 * (j / 4);
  high = static_cast<uint8_t>((high & ~(3 << shift)) | (((stored >> 4) & 3) << shift));
}

/// Where the bits of value `i` live in a 32-value nibble block: qs[i % 16], low or high nibble.
int nibble(const uint8_t *qs, int i) { return i < 16 ? qs[i] & 0x0F : qs[i - 16] >> 4; }
void setNibble(uint8_t *qs, int i, int code) {
  uint8_t &byte = qs[i % 16];
  byte = i < 16 ? static_cast<uint8_t>((byte & 0xF0) | code) : static_cast<uint8_t>((byte & 0x0F) | (code << 4));
}
int bit(const uint8_t *bytes, int i) { return (bytes[i / 8] >> (i % 8)) & 1; }
void setBit(uint8_t *bytes, int i, int value) {
  bytes[i / 8] = static_cast<uint8_t>((bytes[i / 8] & ~(1 << (i % 8))) | (value << (i % 8)));
}

/// Q2_K / Q3_K low two bits of value i: qs[32 * (i / 128) + i % 32] >> 2 * ((i % 128) / 32).
int twoBits(const uint8_t *qs, int i) { return (qs[32 * (i / 128) + i % 32] >> (2 * ((i % 128) / 32))) & 3; }
void setTwoBits(uint8_t *qs, int i, int code) {
  uint8_t &byte = qs[32 * (i / 128) + i % 32];
  const int shift = 2 * ((i % 128) / 32);
  byte = static_cast<uint8_t>((byte & ~(3 << shift)) | (code << shift));
}
/// Q4_K / Q5_K nibble of value i: qs[32 * (i / 64) + i % 32], high nibble for odd sub-blocks of 32.
int nibbleK(const uint8_t *qs, int i) { return (qs[32 * (i / 64) + i % 32] >> (4 * ((i / 32) % 2))) & 0x0F; }
void setNibbleK(uint8_t *qs, int i, int code) {
  uint8_t &byte = qs[32 * (i / 64) + i % 32];
  const int shift = 4 * ((i / 32) % 2);
  byte = static_cast<uint8_t>((byte & ~(0x0F << shift)) | (code << shift));
}
/// Q6_K: row r = i / 32 of 8; low nibble in ql[64 * (r / 4) + 32 * (r % 2) + i % 32] (high half for r % 4 >= 2),
/// two high bits in qh[32 * (r / 4) + i % 32] at 2 * (r % 4).
int codeQ6K(const BlockQ6_K &b, int i) {
  const int r = i / 32, l = i % 32;
  const int low = (b.ql[64 * (r / 4) + 32 * (r % 2) + l] >> (4 * ((r % 4) / 2))) & 0x0F;
  const int high = (b.qh[32 * (r / 4) + l] >> (2 * (r % 4))) & 3;
  return low | (high << 4);
}
void setCodeQ6K(BlockQ6_K &b, int i, int code) {
  const int r = i / 32, l = i % 32;
  uint8_t &low = b.ql[64 * (r / 4) + 32 * (r % 2) + l];
  const int lowShift = 4 * ((r % 4) / 2);
  low = static_cast<uint8_t>((low & ~(0x0F << lowShift)) | ((code & 0x0F) << lowShift));
  uint8_t &high = b.qh[32 * (r / 4) + l];
  const int highShift = 2 * (r % 4);
  high = static_cast<uint8_t>((high & ~(3 << highShift)) | (((code >> 4) & 3) << highShift));
}

/// The value code `q` stands for at index `i` of a block (the format's
/// arithmetic, in its order). Codes: Q3_K -4..3, Q8_0 -128..127, Q6_K
/// 0..63, the others 0..2^bits - 1.
float valueAt(GgmlType type, const uint8_t *block, int i, int q) {
  switch (type) {
  case GgmlType::Q4_0: {
    const auto &b = *reinterpret_cast<const BlockQ4_0 *>(block);
    return half(b.d) * static_cast<float>(q - 8);
  }
  case GgmlType::Q4_1: {
    const auto &b = *reinterpret_cast<const BlockQ4_1 *>(block);
    return half(b.d) * static_cast<float>(q) + half(b.m);
  }
  case GgmlType::Q5_0: {
    const auto &b = *reinterpret_cast<const BlockQ5_0 *>(block);
    return half(b.d) * static_cast<float>(q - 16);
  }
  case GgmlType::Q5_1: {
    const auto &b = *reinterpret_cast<const BlockQ5_1 *>(block);
    return half(b.d) * static_cast<float>(q) + half(b.m);
  }
  case GgmlType::Q8_0: {
    const auto &b = *reinterpret_cast<const BlockQ8_0 *>(block);
    return static_cast<float>(q) * half(b.d);
  }
  case GgmlType::Q2_K: {
    const auto &b = *reinterpret_cast<const BlockQ2_K *>(block);
    const uint8_t sc = b.scales[i / 16];
    const float dl = half(b.d) * static_cast<float>(sc & 0x0F);
    const float ml = half(b.dmin) * static_cast<float>(sc >> 4);
    return dl * static_cast<float>(q) - ml;
  }
  case GgmlType::Q3_K: {
    const auto &b = *reinterpret_cast<const BlockQ3_K *>(block);
    const float dl = half(b.d) * static_cast<float>(scaleQ3K(b.scales, i / 16) - 32);
    return dl * static_cast<float>(q);
  }
  case GgmlType::Q4_K:
  case GgmlType::Q5_K: {
    const uint16_t d = type == GgmlType::Q4_K ? reinterpret_cast<const BlockQ4_K *>(block)->d
                                              : reinterpret_cast<const BlockQ5_K *>(block)->d;
    const uint16_t dmin = type == GgmlType::Q4_K ? reinterpret_cast<const BlockQ4_K *>(block)->dmin
                                                 : reinterpret_cast<const BlockQ5_K *>(block)->dmin;
    const uint8_t *scales = type == GgmlType::Q4_K ? reinterpret_cast<const BlockQ4_K *>(block)->scales
                                                   : reinterpret_cast<const BlockQ5_K *>(block)->scales;
    int sc, m;
    scaleMinK4(scales, i / 32, sc, m);
    const float d1 = half(d) * static_cast<float>(sc);
    const float m1 = half(dmin) * static_cast<float>(m);
    return d1 * static_cast<float>(q) - m1;
  }
  case GgmlType::Q6_K: {
    const auto &b = *reinterpret_cast<const BlockQ6_K *>(block);
    const float dl = half(b.d) * static_cast<float>(b.scales[i / 16]);
    return dl * static_cast<float>(q - 32);
  }
  default:
    return 0.0f;
  }
}

int codeAt(GgmlType type, const uint8_t *block, int i) {
  switch (type) {
  case GgmlType::Q4_0:
    return nibble(reinterpret_cast<const BlockQ4_0 *>(block)->qs, i);
  case GgmlType::Q4_1:
    return nibble(reinterpret_cast<const BlockQ4_1 *>(block)->qs, i);
  case GgmlType::Q5_0: {
    const auto &b = *reinterpret_cast<const BlockQ5_0 *>(block);
    return nibble(b.qs, i) | (bit(b.qh, i) << 4);
  }
  case GgmlType::Q5_1: {
    const auto &b = *reinterpret_cast<const BlockQ5_1 *>(block);
    return nibble(b.qs, i) | (bit(b.qh, i) << 4);
  }
  case GgmlType::Q8_0:
    return reinterpret_cast<const BlockQ8_0 *>(block)->qs[i];
  case GgmlType::Q2_K:
    return twoBits(reinterpret_cast<const BlockQ2_K *>(block)->qs, i);
  case GgmlType::Q3_K: {
    const auto &b = *reinterpret_cast<const BlockQ3_K *>(block);
    const int high = (b.hmask[i % 32] >> (i / 32)) & 1;
    return twoBits(b.qs, i) - (high ? 0 : 4);
  }
  case GgmlType::Q4_K:
    return nibbleK(reinterpret_cast<const BlockQ4_K *>(block)->qs, i);
  case GgmlType::Q5_K: {
    const auto &b = *reinterpret_cast<const BlockQ5_K *>(block);
    return nibbleK(b.qs, i) | (((b.qh[i % 32] >> (i / 32)) & 1) << 4);
  }
  case GgmlType::Q6_K:
    return codeQ6K(*reinterpret_cast<const BlockQ6_K *>(block), i);
  default:
    return 0;
  }
}

void setCodeAt(GgmlType type, uint8_t *block, int i, int q) {
  switch (type) {
  case GgmlType::Q4_0:
    return setNibble(reinterpret_cast<BlockQ4_0 *>(block)->qs, i, q);
  case GgmlType::Q4_1:
    return setNibble(reinterpret_cast<BlockQ4_1 *>(block)->qs, i, q);
  case GgmlType::Q5_0: {
    auto &b = *reinterpret_cast<BlockQ5_0 *>(block);
    setNibble(b.qs, i, q & 0x0F);
    return setBit(b.qh, i, q >> 4);
  }
  case GgmlType::Q5_1: {
    auto &b = *reinterpret_cast<BlockQ5_1 *>(block);
    setNibble(b.qs, i, q & 0x0F);
    return setBit(b.qh, i, q >> 4);
  }
  case GgmlType::Q8_0:
    reinterpret_cast<BlockQ8_0 *>(block)->qs[i] = static_cast<int8_t>(q);
    return;
  case GgmlType::Q2_K:
    return setTwoBits(reinterpret_cast<BlockQ2_K *>(block)->qs, i, q);
  case GgmlType::Q3_K: {
    auto &b = *reinterpret_cast<BlockQ3_K *>(block);
    setTwoBits(b.qs, i, q < 0 ? q + 4 : q);
    uint8_t &mask = b.hmask[i % 32];
    mask = static_cast<uint8_t>((mask & ~(1 << (i / 32))) | ((q < 0 ? 0 : 1) << (i / 32)));
    return;
  }
  case GgmlType::Q4_K:
    return setNibbleK(reinterpret_cast<BlockQ4_K *>(block)->qs, i, q);
  case GgmlType::Q5_K: {
    auto &b = *reinterpret_cast<BlockQ5_K *>(block);
    setNibbleK(b.qs, i, q & 0x0F);
    uint8_t &high = b.qh[i % 32];
    high = static_cast<uint8_t>((high & ~(1 << (i / 32))) | ((q >> 4) << (i / 32)));
    return;
  }
  case GgmlType::Q6_K:
    return setCodeQ6K(*reinterpret_cast<BlockQ6_K *>(block), i, q);
  default:
    return;
  }
}

/// The code range of a format.
void codeRange(GgmlType type, int &lo, int &hi) {
  switch (type) {
  case GgmlType::Q8_0:
    lo = -128, hi = 127;
    return;
  case GgmlType::Q3_K:
    lo = -4, hi = 3;
    return;
  default:
    lo = 0, hi = (1 << ggmlTraits(type)->bits) - 1;
  }
}

// --- Choosing scales ---------------------------------------------------------

/// value ~ scale * q + offset, q in [0, top]; offset <= 0 when `offsetAtMostZero`.
struct AffineFit {
  float scale = 0, offset = 0;
};

double weightedError(const float *x, const float *w, int n, float scale, float offset, int lo, int hi) {
  double error = 0;
  const float inverse = scale != 0 ? 1.0f / scale : 0.0f;
  for (int i = 0; i < n; ++i) {
    const int q = std::clamp(static_cast<int>(std::nearbyint((x[i] - offset) * inverse)), lo, hi);
    const double diff = static_cast<double>(scale) * q + offset - x[i];
    error += (w ? w[i] : 1.0) * diff * diff;
  }
  return error;
}

/// Asymmetric fit: a search over grids that stretch the range a little
/// either way, each refined by weighted least squares on its codes.
AffineFit fitAffine(const float *x, const float *w, int n, int top, bool offsetAtMostZero) {
  float lo = *std::min_element(x, x + n), hi = *std::max_element(x, x + n);
  if (offsetAtMostZero)
    lo = std::min(lo, 0.0f);
  AffineFit best{(hi - lo) / static_cast<float>(top), lo};
  if (hi <= lo)
    return AffineFit{0.0f, offsetAtMostZero ? 0.0f : lo};
  double bestError = weightedError(x, w, n, best.scale, best.offset, 0, top);
  for (int step = 0; step <= 20; ++step) {
    const float inverse = (static_cast<float>(top) - 1.0f + 0.1f * static_cast<float>(step)) / (hi - lo);
    double sw = 0, sq = 0, sqq = 0, sx = 0, sqx = 0;
    for (int i = 0; i < n; ++i) {
      const double q = std::clamp(static_cast<int>(std::nearbyint((x[i] - lo) * inverse)), 0, top);
      const double wi = w ? w[i] : 1.0;
      sw += wi, sq += wi * q, sqq += wi * q * q, sx += wi * x[i], sqx += wi * q * x[i];
    }
    const double det = sw * sqq - sq * sq;
    if (det <= 0)
      continue;
    double scale = (sw * sqx - sq * sx) / det, offset = (sqq * sx - sq * sqx) / det;
    if (offsetAtMostZero && offset > 0) {
      offset = 0;
      scale = sqq > 0 ? sqx / sqq : 0;
    }
    if (scale <= 0)
      continue;
    const double error = weightedError(x, w, n, static_cast<float>(scale), static_cast<float>(offset), 0, top);
    if (error < bestError) {
      bestError = error;
      best = {static_cast<float>(scale), static_cast<float>(offset)};
    }
  }
  return best;
}

/// Symmetric fit, value ~ scale * q with q in [lo, hi] (lo = -hi - 1): the
/// largest magnitude lands near the wider negative end; refined by least squares.
float fitScale(const float *x, const float *w, int n, int lo, int hi) {
  int extreme = 0;
  for (int i = 1; i < n; ++i)
    if (std::fabs(x[i]) > std::fabs(x[extreme]))
      extreme = i;
  const float peak = x[extreme];
  if (peak == 0.0f)
    return 0.0f;
  float best = peak / static_cast<float>(lo);
  double bestError = weightedError(x, w, n, best, 0.0f, lo, hi);
  for (int step = -9; step <= 9; ++step) {
    const float scale = peak / (static_cast<float>(lo) + 0.1f * static_cast<float>(step));
    double sqq = 0, sqx = 0;
    const float inverse = 1.0f / scale;
    for (int i = 0; i < n; ++i) {
      const double q = std::clamp(static_cast<int>(std::nearbyint(x[i] * inverse)), lo, hi);
      const double wi = w ? w[i] : 1.0;
      sqq += wi * q * q, sqx += wi * q * x[i];
    }
    for (float candidate : {scale, sqq > 0 ? static_cast<float>(sqx / sqq) : scale}) {
      if (candidate == 0.0f)
        continue;
      const double error = weightedError(x, w, n, candidate, 0.0f, lo, hi);
      if (error < bestError) {
        bestError = error;
        best = candidate;
      }
    }
  }
  return best;
}

/// The nearest representable fraction code of `value / unit` in [lo, hi].
int nearestLevel(float value, float unit, int lo, int hi) {
  return unit != 0.0f ? std::clamp(static_cast<int>(std::nearbyint(value / unit)), lo, hi) : 0;
}

} // namespace

namespace {

/// One block's values with valueAt's arithmetic, in its order, but each
/// (sub-)block's scales converted once; `T` constant, so codeAt's switch
/// folds away.
template <GgmlType T> void decodeBlock(const uint8_t *block, float *out) {
  if constexpr (T == GgmlType::Q4_0 || T == GgmlType::Q5_0) {
    const float d = half(reinterpret_cast<const BlockQ4_0 *>(block)->d); // d first in both
    const int zero = T == GgmlType::Q4_0 ? 8 : 16;
    for (int i = 0; i < 32; ++i)
      out[i] = d * static_cast<float>(codeAt(T, block, i) - zero);
  } else if constexpr (T == GgmlType::Q4_1 || T == GgmlType::Q5_1) {
    const auto &b = *reinterpret_cast<const BlockQ4_1 *>(block); // d, m first in both
    const float d = half(b.d), m = half(b.m);
    for (int i = 0; i < 32; ++i)
      out[i] = d * static_cast<float>(codeAt(T, block, i)) + m;
  } else if constexpr (T == GgmlType::Q8_0) {
    const auto &b = *reinterpret_cast<const BlockQ8_0 *>(block);
    const float d = half(b.d);
    for (int i = 0; i < 32; ++i)
      out[i] = static_cast<float>(b.qs[i]) * d;
  } else if constexpr (T == GgmlType::Q2_K) {
    const auto &b = *reinterpret_cast<const BlockQ2_K *>(block);
    const float d = half(b.d), dmin = half(b.dmin);
    for (int s = 0; s < 16; ++s) {
      const float dl = d * static_cast<float>(b.scales[s] & 0x0F), ml = dmin * static_cast<float>(b.scales[s] >> 4);
      for (int i = 16 * s; i < 16 * s + 16; ++i)
        out[i] = dl * static_cast<float>(twoBits(b.qs, i)) - ml;
    }
  } else if constexpr (T == GgmlType::Q3_K) {
    const auto &b = *reinterpret_cast<const BlockQ3_K *>(block);
    const float d = half(b.d);
    for (int s = 0; s < 16; ++s) {
      const float dl = d * static_cast<float>(scaleQ3K(b.scales, s) - 32);
      for (int i = 16 * s; i < 16 * s + 16; ++i)
        out[i] = dl * static_cast<float>(codeAt(T, block, i));
    }
  } else if constexpr (T == GgmlType::Q4_K || T == GgmlType::Q5_K) {
    const auto &b = *reinterpret_cast<const BlockQ4_K *>(block); // d, dmin, scales first in both
    const float d = half(b.d), dmin = half(b.dmin);
    for (int s = 0; s < 8; ++s) {
      int sc, m;
      scaleMinK4(b.scales, s, sc, m);
      const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(m);
      for (int i = 32 * s; i < 32 * s + 32; ++i)
        out[i] = d1 * static_cast<float>(codeAt(T, block, i)) - m1;
    }
  } else {
    const auto &b = *reinterpret_cast<const BlockQ6_K *>(block);
    const float d = half(b.d);
    for (int s = 0; s < 16; ++s) {
      const float dl = d * static_cast<float>(b.scales[s]);
      for (int i = 16 * s; i < 16 * s + 16; ++i)
        out[i] = dl * static_cast<float>(codeQ6K(b, i) - 32);
    }
  }
}

} // namespace

void ggmlDequantizeBlock(GgmlType type, const uint8_t *block, float *out) {
  switch (type) {
  case GgmlType::Q4_0:
    return decodeBlock<GgmlType::Q4_0>(block, out);
  case GgmlType::Q4_1:
    return decodeBlock<GgmlType::Q4_1>(block, out);
  case GgmlType::Q5_0:
    return decodeBlock<GgmlType::Q5_0>(block, out);
  case GgmlType::Q5_1:
    return decodeBlock<GgmlType::Q5_1>(block, out);
  case GgmlType::Q8_0:
    return decodeBlock<GgmlType::Q8_0>(block, out);
  case GgmlType::Q2_K:
    return decodeBlock<GgmlType::Q2_K>(block, out);
  case GgmlType::Q3_K:
    return decodeBlock<GgmlType::Q3_K>(block, out);
  case GgmlType::Q4_K:
    return decodeBlock<GgmlType::Q4_K>(block, out);
  case GgmlType::Q5_K:
    return decodeBlock<GgmlType::Q5_K>(block, out);
  case GgmlType::Q6_K:
    return decodeBlock<GgmlType::Q6_K>(block, out);
  default:
    return;
  }
}

void ggmlDequantizeRow(GgmlType type, const uint8_t *row, int64_t n, float *out) {
  const GgmlTraits *traits = ggmlTraits(type);
  if (type == GgmlType::F32) {
    std::memcpy(out, row, static_cast<size_t>(n) * 4);
    return;
  }
  if (type == GgmlType::F16 || type == GgmlType::BF16) {
    for (int64_t i = 0; i < n; ++i) {
      uint16_t bits;
      std::memcpy(&bits, row + 2 * i, 2);
      out[i] = scaleToFloat(bits, type == GgmlType::F16 ? ScaleType::F16 : ScaleType::BF16);
    }
    return;
  }
  for (int64_t b = 0; b < n / traits->blockSize; ++b)
    ggmlDequantizeBlock(type, row + b * traits->blockBytes, out + b * traits->blockSize);
}

void ggmlChooseScales(GgmlType type, const float *x, const float *w, uint8_t *block) {
  const GgmlTraits *traits = ggmlTraits(type);
  std::memset(block, 0, static_cast<size_t>(traits->blockBytes));
  switch (type) {
  case GgmlType::Q4_0:
    reinterpret_cast<BlockQ4_0 *>(block)->d = toHalf(fitScale(x, w, 32, -8, 7));
    return;
  case GgmlType::Q5_0:
    reinterpret_cast<BlockQ5_0 *>(block)->d = toHalf(fitScale(x, w, 32, -16, 15));
    return;
  case GgmlType::Q8_0:
    reinterpret_cast<BlockQ8_0 *>(block)->d = toHalf(fitScale(x, w, 32, -128, 127));
    return;
  case GgmlType::Q4_1:
  case GgmlType::Q5_1: {
    const AffineFit fit = fitAffine(x, w, 32, type == GgmlType::Q4_1 ? 15 : 31, /*offsetAtMostZero=*/false);
    // The stored min rounds down, so the grid still reaches the lowest value.
    uint16_t m = toHalf(fit.offset);
    if (half(m) > fit.offset)
      m = toHalf(std::nextafter(half(m), -INFINITY));
    const uint16_t d = toHalf(fit.scale);
    if (type == GgmlType::Q4_1) {
      reinterpret_cast<BlockQ4_1 *>(block)->d = d;
      reinterpret_cast<BlockQ4_1 *>(block)->m = m;
    } else {
      reinterpret_cast<BlockQ5_1 *>(block)->d = d;
      reinterpret_cast<BlockQ5_1 *>(block)->m = m;
    }
    return;
  }
  case GgmlType::Q2_K:
  case GgmlType::Q4_K:
  case GgmlType::Q5_K: {
    // Sub-blocks: value = scale * q - min, min >= 0; scales and mins are
    // then quantized to 4 (Q2_K) or 6 bits against fp16 d and dmin.
    const int sub = type == GgmlType::Q2_K ? 16 : 32, count = kSuperBlock / sub;
    const int top = type == GgmlType::Q2_K ? 3 : type == GgmlType::Q4_K ? 15 : 31;
    const int levels = type == GgmlType::Q2_K ? 15 : 63;
    float scales[16], mins[16], maxScale = 0, maxMin = 0;
    for (int j = 0; j < count; ++j) {
      const AffineFit fit = fitAffine(x + j * sub, w ? w + j * sub : nullptr, sub, top, /*offsetAtMostZero=*/true);
      scales[j] = fit.scale;
      mins[j] = -fit.offset;
      maxScale = std::max(maxScale, scales[j]);
      maxMin = std::max(maxMin, mins[j]);
    }
    const uint16_t d = toHalf(maxScale / static_cast<float>(levels));
    const uint16_t dmin = toHalf(maxMin / static_cast<float>(levels));
    for (int j = 0; j < count; ++j) {
      const int sc = nearestLevel(scales[j], half(d), 0, levels), m = nearestLevel(mins[j], half(dmin), 0, levels);
      if (type == GgmlType::Q2_K)
        reinterpret_cast<BlockQ2_K *>(block)->scales[j] = static_cast<uint8_t>(sc | (m << 4));
      else
        setScaleMinK4(type == GgmlType::Q4_K ? reinterpret_cast<BlockQ4_K *>(block)->scales
                                             : reinterpret_cast<BlockQ5_K *>(block)->scales,
                      j, sc, m);
    }
    if (type == GgmlType::Q2_K) {
      reinterpret_cast<BlockQ2_K *>(block)->d = d;
      reinterpret_cast<BlockQ2_K *>(block)->dmin = dmin;
    } else if (type == GgmlType::Q4_K) {
      reinterpret_cast<BlockQ4_K *>(block)->d = d;
      reinterpret_cast<BlockQ4_K *>(block)->dmin = dmin;
    } else {
      reinterpret_cast<BlockQ5_K *>(block)->d = d;
      reinterpret_cast<BlockQ5_K *>(block)->dmin = dmin;
    }
    return;
  }
  case GgmlType::Q3_K:
  case GgmlType::Q6_K: {
    // Sixteen signed sub-block scales, quantized against fp16 d so that the
    // largest in magnitude lands on the wider negative end.
    const bool q3 = type == GgmlType::Q3_K;
    float scales[16];
    int peak = 0;
    for (int j = 0; j < 16; ++j) {
      scales[j] = fitScale(x + 16 * j, w ? w + 16 * j : nullptr, 16, q3 ? -4 : -32, q3 ? 3 : 31);
      if (std::fabs(scales[j]) > std::fabs(scales[peak]))
        peak = j;
    }
    const int lo = q3 ? -32 : -128, hi = q3 ? 31 : 127;
    const uint16_t d = toHalf(scales[peak] / static_cast<float>(lo));
    for (int j = 0; j < 16; ++j) {
      const int sc = nearestLevel(scales[j], half(d), lo, hi);
      if (q3)
        setScaleQ3K(reinterpret_cast<BlockQ3_K *>(block)->scales, j, sc + 32);
      else
        reinterpret_cast<BlockQ6_K *>(block)->scales[j] = static_cast<int8_t>(sc);
    }
    if (q3)
      reinterpret_cast<BlockQ3_K *>(block)->d = d;
    else
      reinterpret_cast<BlockQ6_K *>(block)->d = d;
    // Q3_K's zero code is q = 0 (high bit set): a zeroed block reads -4.
    if (q3)
      for (int i = 0; i < kSuperBlock; ++i)
        setCodeAt(type, block, i, 0);
    else
      for (int i = 0; i < kSuperBlock; ++i)
        setCodeAt(type, block, i, 32);
    return;
  }
  default:
    return;
  }
}

float ggmlQuantizeValue(GgmlType type, uint8_t *block, int index, float value) {
  int lo, hi;
  codeRange(type, lo, hi);
  // The grid is affine in the code: v(q) = v(0) + q * (v(1) - v(0)) up to
  // rounding; start from its nearest code, then check the neighbours with
  // the format's exact arithmetic.
  const float v0 = valueAt(type, block, index, 0), step = valueAt(type, block, index, 1) - v0;
  int q =
      step != 0.0f ? std::clamp(static_cast<int>(std::nearbyint((value - v0) / step)), lo, hi) : std::clamp(0, lo, hi);
  float best = valueAt(type, block, index, q);
  for (int candidate : {q - 1, q + 1}) {
    if (candidate < lo || candidate > hi)
      continue;
    const float v = valueAt(type, block, index, candidate);
    if (std::fabs(v - value) < std::fabs(best - value)) {
      best = v;
      q = candidate;
    }
  }
  setCodeAt(type, block, index, q);
  return best;
}

void ggmlQuantizeRow(GgmlType type, const float *values, int64_t n, uint8_t *out, const float *importance) {
  const GgmlTraits *traits = ggmlTraits(type);
  if (!isGgmlBlockFormat(type)) {
    for (int64_t i = 0; i < n; ++i) {
      if (type == GgmlType::F32) {
        std::memcpy(out + 4 * i, values + i, 4);
      } else {
        const uint16_t bits = floatToScale(values[i], type == GgmlType::F16 ? ScaleType::F16 : ScaleType::BF16);
        std::memcpy(out + 2 * i, &bits, 2);
      }
    }
    return;
  }
  for (int64_t b = 0; b < n / traits->blockSize; ++b) {
    uint8_t *block = out + b * traits->blockBytes;
    const float *x = values + b * traits->blockSize;
    ggmlChooseScales(type, x, importance ? importance + b * traits->blockSize : nullptr, block);
    for (int i = 0; i < traits->blockSize; ++i)
      ggmlQuantizeValue(type, block, i, x[i]);
  }
}

void ggmlQuantizeRows(GgmlType type, const float *values, int64_t rows, int64_t cols, uint8_t *out) {
  const size_t rowBytes = ggmlRowBytes(type, cols);
  for (int64_t r = 0; r < rows; ++r)
    ggmlQuantizeRow(type, values + r * cols, cols, out + static_cast<size_t>(r) * rowBytes);
}

} // namespace moe::quant
