//===- QuantKernels.cpp - CPU kernels over group-wise integer weights -----===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "cpu/QuantKernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace moe::quant {

namespace {

constexpr int kBlock = 32;

/// Unpacks the 32 codes of planar block `block` of a group.
void unpack32(const uint8_t *codes, int bits, int64_t block, uint8_t *out) {
  const uint8_t *bytes = codes + block * kBlock * bits / 8;
  switch (bits) {
  case 8:
    std::memcpy(out, bytes, 32);
    return;
  case 4:
    for (int j = 0; j < 16; ++j) {
      out[j] = bytes[j] & 0x0f;
      out[j + 16] = bytes[j] >> 4;
    }
    return;
  case 2:
    for (int j = 0; j < 32; ++j)
      out[j] = (bytes[j % 8] >> (2 * (j / 8))) & 3;
    return;
  default: // 3
    for (int j = 0; j < 32; ++j)
      out[j] = static_cast<uint8_t>(((bytes[j % 8] >> (2 * (j / 8))) & 3) | (((bytes[8 + j / 8] >> (j % 8)) & 1) << 2));
  }
}

void groupHeader(const QuantFormat &format, const uint8_t *group, float &scale, float &min) {
  uint16_t bits;
  std::memcpy(&bits, group, 2);
  scale = scaleToFloat(bits, format.scaleType);
  if (format.symmetric) {
    min = -static_cast<float>(format.zeroPoint()) * scale;
  } else {
    std::memcpy(&bits, group + 2, 2);
    min = scaleToFloat(bits, format.scaleType);
  }
}

#if defined(__x86_64__)
/// The 32 codes of planar block `block` as bytes, in code order.
__attribute__((target("avx2,fma,f16c"))) inline __m256i load32Codes(const uint8_t *codes, int bits, int64_t block) {
  const uint8_t *bytes = codes + block * kBlock * bits / 8;
  if (bits == 8)
    return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(bytes));
  if (bits == 4) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i *>(bytes));
    const __m128i mask = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), mask), _mm_and_si128(packed, mask));
  }
  // Eight bytes of 2-bit planes, replicated per 64-bit lane and shifted by
  // 0, 2, 4, 6: lane q holds codes 8q .. 8q + 7.
  uint64_t planes;
  std::memcpy(&planes, bytes, 8);
  const __m256i low = _mm256_and_si256(
      _mm256_srlv_epi64(_mm256_set1_epi64x(static_cast<int64_t>(planes)), _mm256_setr_epi64x(0, 2, 4, 6)),
      _mm256_set1_epi8(3));
  if (bits == 2)
    return low;
  // 3 bits: byte j takes bit j % 8 of high-plane byte j / 8.
  uint32_t high;
  std::memcpy(&high, bytes + 8, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int32_t>(high)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_or_si256(low, _mm256_and_si256(set, _mm256_set1_epi8(4)));
}

/// The decode GEMV over one row range; DOT(acc, u8 codes, s8 activation)
/// adds the four-byte dot products of each 32-bit lane to acc.
#define MOEC_GEMV_ROWS_BODY(DOT)                                                                                       \
  const QuantFormat &format = w.format;                                                                                \
  const int64_t groups = format.groupsPerRow(w.cols);                                                                  \
  const int blocksPerGroup = format.group / kBlock;                                                                    \
  const size_t rowBytes = format.rowBytes(w.cols), groupBytes = format.groupBytes();                                   \
  for (int64_t r = rowBegin; r < rowEnd; ++r) {                                                                        \
    const uint8_t *row = w.data + static_cast<size_t>(r) * rowBytes;                                                   \
    __m256 acc = _mm256_setzero_ps();                                                                                  \
    float minTerm = 0.0f;                                                                                              \
    for (int64_t g = 0; g < groups; ++g) {                                                                             \
      const uint8_t *group = row + static_cast<size_t>(g) * groupBytes;                                                \
      if (g + 1 < groups)                                                                                              \
        _mm_prefetch(reinterpret_cast<const char *>(group + groupBytes + 64), _MM_HINT_T0);                            \
      /* Header conversions inline (F16C for fp16; bf16 is a shift). */                                                \
      uint16_t scaleBits, minBits = 0;                                                                                 \
      std::memcpy(&scaleBits, group, 2);                                                                               \
      if (!format.symmetric)                                                                                           \
        std::memcpy(&minBits, group + 2, 2);                                                                           \
      float scale, min;                                                                                                \
      if (format.scaleType == ScaleType::F16) {                                                                        \
        scale = _cvtsh_ss(scaleBits);                                                                                  \
        min = format.symmetric ? -static_cast<float>(format.zeroPoint()) * scale : _cvtsh_ss(minBits);                 \
      } else {                                                                                                         \
        uint32_t wide = static_cast<uint32_t>(scaleBits) << 16;                                                        \
        std::memcpy(&scale, &wide, 4);                                                                                 \
        wide = static_cast<uint32_t>(minBits) << 16;                                                                   \
        std::memcpy(&min, &wide, 4);                                                                                   \
        if (format.symmetric)                                                                                          \
          min = -static_cast<float>(format.zeroPoint()) * scale;                                                       \
      }                                                                                                                \
      const uint8_t *codes = group + format.headerBytes();                                                             \
      __m256i groupSums = _mm256_setzero_si256();                                                                      \
      for (int b = 0; b < blocksPerGroup; ++b) {                                                                       \
        const __m256i q = load32Codes(codes, format.bits, b);                                                          \
        const __m256i a =                                                                                              \
            _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x.values.data() + g * format.group + b * kBlock));    \
        if (format.bits == 8) {                                                                                        \
          /* Codes up to 255 would overflow the unsigned x signed byte      */                                         \
          /* products' pairs: use q - 128 (|q - 128| <= 128) with the sign  */                                         \
          /* trick, and add 128 * sum(a) back through the min term below.   */                                         \
          /* (Two's complement codes are centred already.)                 */                                          \
          const __m256i centred = w.signedCodes ? q : _mm256_xor_si256(q, _mm256_set1_epi8(static_cast<char>(0x80)));  \
          groupSums = DOT(groupSums, _mm256_sign_epi8(centred, centred), _mm256_sign_epi8(a, centred));                \
        } else {                                                                                                       \
          groupSums = DOT(groupSums, q, a);                                                                            \
        }                                                                                                              \
      }                                                                                                                \
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(groupSums), _mm256_set1_ps(scale * x.blockScales[g]), acc);             \
      minTerm += (format.bits == 8 ? min + 128.0f * scale : min) * x.groupSums[g];                                     \
    }                                                                                                                  \
    __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));                              \
    sum4 = _mm_hadd_ps(sum4, sum4);                                                                                    \
    sum4 = _mm_hadd_ps(sum4, sum4);                                                                                    \
    y[r - rowBegin] = _mm_cvtss_f32(sum4) + minTerm;                                                                   \
  }

/// AVX2: unsigned x signed byte products summed in pairs (int16; codes below
/// 16, or |q - 128| <= 128 against |a| <= 127, cannot overflow), then in
/// fours (int32).
__attribute__((target("avx2"))) inline __m256i dotAvx2(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

__attribute__((target("avx2,fma,f16c"))) void gemvRowsAvx2(const QuantMatrixView &w, const QuantizedActivation &x,
                                                           int64_t rowBegin, int64_t rowEnd, float *y) {
  MOEC_GEMV_ROWS_BODY(dotAvx2)
}

/// AVX-VNNI: one vpdpbusd per 32 bytes, accumulating straight into int32.
__attribute__((target("avx2,fma,f16c,avxvnni"))) inline __m256i dotVnni(__m256i acc, __m256i u, __m256i s) {
  return _mm256_dpbusd_avx_epi32(acc, u, s);
}

__attribute__((target("avx2,fma,f16c,avxvnni"))) void
gemvRowsVnni(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin, int64_t rowEnd, float *y) {
  MOEC_GEMV_ROWS_BODY(dotVnni)
}

/// AVX-512 with VNNI (Ice Lake / Sapphire Rapids Xeons, Zen 4): 64 codes per
/// zmm, one vpdpbusd each. Unsigned codes of every width, 8 bits included,
/// go straight into vpdpbusd (it sums four products in int32 without the
/// int16 pair saturation that forces AVX2's sign trick); two's complement
/// codes (ggml's Q8_0) take |q| against the activation negated where q < 0.
#define MOEC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/// Two 4-bit blocks' 32 bytes (block 0 in the low half) as their 64 codes:
/// each block's 16 bytes twice, low nibbles (codes 0..15) then high (16..31).
MOEC_AVX512 inline __m512i spreadNibbles(__m256i packed) {
  const __m512i spread =
      _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 0, 1, 2, 3, 2, 3), _mm512_castsi256_si512(packed));
  return _mm512_and_si512(_mm512_srlv_epi64(spread, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(0x0f));
}

/// Two blocks' eight bytes of 2-bit planes (block 0 in the low qword) as
/// their 64 low code bits: each block's qword four times, shifted by 0, 2, 4, 6.
MOEC_AVX512 inline __m512i spreadCrumbs(__m128i packed) {
  const __m512i spread =
      _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 0, 0, 0, 1, 1, 1, 1), _mm512_castsi128_si512(packed));
  return _mm512_and_si512(_mm512_srlv_epi64(spread, _mm512_setr_epi64(0, 2, 4, 6, 0, 2, 4, 6)), _mm512_set1_epi8(3));
}

/// The 64 codes of two planar blocks (at b0 and b1) as bytes, in code order.
template <int Bits> MOEC_AVX512 inline __m512i load64Codes(const uint8_t *b0, const uint8_t *b1) {
  if constexpr (Bits == 8) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(b0))),
                              _mm256_loadu_si256(reinterpret_cast<const __m256i *>(b1)), 1);
  } else if constexpr (Bits == 4) {
    return spreadNibbles(
        _mm256_loadu2_m128i(reinterpret_cast<const __m128i *>(b1), reinterpret_cast<const __m128i *>(b0)));
  } else {
    uint64_t p0, p1;
    std::memcpy(&p0, b0, 8);
    std::memcpy(&p1, b1, 8);
    const __m512i low = spreadCrumbs(_mm_set_epi64x(static_cast<int64_t>(p1), static_cast<int64_t>(p0)));
    if constexpr (Bits == 2)
      return low;
    // 3 bits: code j's high bit is bit j of the block's 32-bit high plane,
    // so the two planes are the byte mask of the codes that add 4.
    uint32_t h0, h1;
    std::memcpy(&h0, b0 + 8, 4);
    std::memcpy(&h1, b1 + 8, 4);
    const __mmask64 high = static_cast<__mmask64>(h0) | (static_cast<__mmask64>(h1) << 32);
    return _mm512_mask_add_epi8(low, high, low, _mm512_set1_epi8(4));
  }
}

/// load64Codes of two consecutive blocks (b1 = b0 + one block), one load.
template <int Bits> MOEC_AVX512 inline __m512i load64CodesContiguous(const uint8_t *b0) {
  if constexpr (Bits == 8)
    return _mm512_loadu_si512(b0);
  else if constexpr (Bits == 4)
    return spreadNibbles(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(b0)));
  else if constexpr (Bits == 2)
    return spreadCrumbs(_mm_loadu_si128(reinterpret_cast<const __m128i *>(b0)));
  else
    return load64Codes<Bits>(b0, b0 + kBlock * Bits / 8);
}

template <bool SignedCodes> MOEC_AVX512 inline __m512i dot512(__m512i acc, __m512i codes, __m512i a) {
  if constexpr (SignedCodes) {
    const __mmask64 negative = _mm512_movepi8_mask(codes);
    return _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(codes),
                               _mm512_mask_sub_epi8(a, negative, _mm512_setzero_si512(), a));
  } else {
    return _mm512_dpbusd_epi32(acc, codes, a);
  }
}

/// Scale and min of a group header (min 0 for two's complement codes).
template <int Bits, bool SignedCodes, bool Symmetric, bool F16Scales>
MOEC_AVX512 inline void header512(const uint8_t *group, float &scale, float &min) {
  uint16_t scaleBits, minBits = 0;
  std::memcpy(&scaleBits, group, 2);
  if constexpr (!Symmetric)
    std::memcpy(&minBits, group + 2, 2);
  if constexpr (F16Scales) {
    scale = _cvtsh_ss(scaleBits);
    min = Symmetric ? 0.0f : _cvtsh_ss(minBits);
  } else {
    uint32_t wide = static_cast<uint32_t>(scaleBits) << 16;
    std::memcpy(&scale, &wide, 4);
    wide = static_cast<uint32_t>(minBits) << 16;
    std::memcpy(&min, &wide, 4);
  }
  if constexpr (Symmetric)
    min = SignedCodes ? 0.0f : -static_cast<float>(1 << (Bits - 1)) * scale;
}

/// The 16-bit header field at `offset` of four consecutive groups, as floats.
template <bool Symmetric, bool F16Scales>
MOEC_AVX512 inline __m128 headers4(const uint8_t *group, size_t groupBytes, size_t offset) {
  uint16_t h[4];
  for (int i = 0; i < 4; ++i)
    std::memcpy(&h[i], group + i * groupBytes + offset, 2);
  uint64_t packed;
  std::memcpy(&packed, h, 8);
  const __m128i bits = _mm_cvtsi64_si128(static_cast<int64_t>(packed));
  if constexpr (F16Scales)
    return _mm_cvtph_ps(bits);
  else
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16));
}

/// Pairs: zmm per group (1 for groups of 64, 2 for 128), or 0 for groups of
/// 32 (two groups per zmm).
template <int Bits, bool SignedCodes, bool Symmetric, bool F16Scales, int Pairs>
MOEC_AVX512 void gemvRowsAvx512(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin,
                                int64_t rowEnd, float *y) {
  const QuantFormat &format = w.format;
  const int64_t groups = format.groupsPerRow(w.cols);
  const size_t rowBytes = format.rowBytes(w.cols), groupBytes = format.groupBytes(), headerBytes = format.headerBytes();
  constexpr size_t blockBytes = kBlock * Bits / 8;
  const int8_t *activation = x.values.data();
  const float *activationScales = x.blockScales.data(), *activationSums = x.groupSums.data();
  for (int64_t r = rowBegin; r < rowEnd; ++r) {
    const uint8_t *row = w.data + static_cast<size_t>(r) * rowBytes;
    __m512 acc = _mm512_setzero_ps();
    float minTerm = 0.0f;
    if constexpr (Pairs == 0) {
      // Two groups per zmm: lanes 0..7 carry the first group's sums, 8..15
      // the second's. Four groups per step: their headers converted and
      // scaled as one vector, the min terms summed in one too.
      int64_t g = 0;
      __m512 acc1 = _mm512_setzero_ps();
      __m128 minAcc = _mm_setzero_ps();
      const __m512i firstPair = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
      const __m512i secondPair = _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
      for (; g + 4 <= groups; g += 4) {
        const uint8_t *g0 = row + static_cast<size_t>(g) * groupBytes;
        _mm_prefetch(reinterpret_cast<const char *>(g0 + 8 * groupBytes), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char *>(g0 + 8 * groupBytes + 64), _MM_HINT_T0);
        const __m128 scales = headers4<Symmetric, F16Scales>(g0, groupBytes, 0);
        if constexpr (!SignedCodes) {
          const __m128 mins = Symmetric ? _mm_mul_ps(scales, _mm_set1_ps(-static_cast<float>(1 << (Bits - 1))))
                                        : headers4<Symmetric, F16Scales>(g0, groupBytes, 2);
          minAcc = _mm_fmadd_ps(mins, _mm_loadu_ps(activationSums + g), minAcc);
        }
        const __m512 products = _mm512_castps128_ps512(_mm_mul_ps(scales, _mm_loadu_ps(activationScales + g)));
        const __m512i codes01 = load64Codes<Bits>(g0 + headerBytes, g0 + groupBytes + headerBytes);
        const __m512i codes23 = load64Codes<Bits>(g0 + 2 * groupBytes + headerBytes, g0 + 3 * groupBytes + headerBytes);
        const __m512i sums01 =
            dot512<SignedCodes>(_mm512_setzero_si512(), codes01, _mm512_loadu_si512(activation + g * kBlock));
        const __m512i sums23 =
            dot512<SignedCodes>(_mm512_setzero_si512(), codes23, _mm512_loadu_si512(activation + g * kBlock + 64));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums01), _mm512_permutexvar_ps(firstPair, products), acc);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums23), _mm512_permutexvar_ps(secondPair, products), acc1);
      }
      acc = _mm512_add_ps(acc, acc1);
      minAcc = _mm_add_ps(minAcc, _mm_movehl_ps(minAcc, minAcc));
      minAcc = _mm_add_ss(minAcc, _mm_movehdup_ps(minAcc));
      minTerm += _mm_cvtss_f32(minAcc);
      for (; g + 2 <= groups; g += 2) {
        const uint8_t *g0 = row + static_cast<size_t>(g) * groupBytes, *g1 = g0 + groupBytes;
        _mm_prefetch(reinterpret_cast<const char *>(g0 + 4 * groupBytes), _MM_HINT_T0);
        float s0, m0, s1, m1;
        header512<Bits, SignedCodes, Symmetric, F16Scales>(g0, s0, m0);
        header512<Bits, SignedCodes, Symmetric, F16Scales>(g1, s1, m1);
        const __m512i codes = load64Codes<Bits>(g0 + headerBytes, g1 + headerBytes);
        const __m512i a = _mm512_loadu_si512(activation + g * kBlock);
        const __m512i sums = dot512<SignedCodes>(_mm512_setzero_si512(), codes, a);
        const __m512 scales = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(s0 * activationScales[g]),
                                                   _mm512_set1_ps(s1 * activationScales[g + 1]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), scales, acc);
        minTerm += m0 * activationSums[g] + m1 * activationSums[g + 1];
      }
      if (g < groups) {
        // The odd last group: its codes twice, the activation's upper half masked off.
        const uint8_t *g0 = row + static_cast<size_t>(g) * groupBytes;
        float s0, m0;
        header512<Bits, SignedCodes, Symmetric, F16Scales>(g0, s0, m0);
        const __m512i codes = load64Codes<Bits>(g0 + headerBytes, g0 + headerBytes);
        const __m512i a = _mm512_maskz_loadu_epi8(0xffffffffULL, activation + g * kBlock);
        const __m512i sums = dot512<SignedCodes>(_mm512_setzero_si512(), codes, a);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(s0 * activationScales[g]), acc);
        minTerm += m0 * activationSums[g];
      }
    } else {
      // Groups of 64 or 128: one or two zmm per group (unrolled).
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t *group = row + static_cast<size_t>(g) * groupBytes;
        _mm_prefetch(reinterpret_cast<const char *>(group + 2 * groupBytes), _MM_HINT_T0);
        float scale, min;
        header512<Bits, SignedCodes, Symmetric, F16Scales>(group, scale, min);
        const uint8_t *codes = group + headerBytes;
        const int8_t *a = activation + g * 2 * kBlock * Pairs;
        __m512i sums = _mm512_setzero_si512();
        for (int p = 0; p < Pairs; ++p)
          sums = dot512<SignedCodes>(sums, load64CodesContiguous<Bits>(codes + 2 * p * blockBytes),
                                     _mm512_loadu_si512(a + p * 2 * kBlock));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(scale * activationScales[g]), acc);
        minTerm += min * activationSums[g];
      }
    }
    y[r - rowBegin] = _mm512_reduce_add_ps(acc) + minTerm;
  }
}

/// Tokens per pass of the integer GEMM: each row's codes are unpacked once
/// and dotted with this many activations (eight float accumulators).
constexpr int kGemmTokens = 8;

/// Prefill: `count` (<= kGemmTokens) activations against rows [rowBegin,
/// rowEnd). Per group: the header once, the codes unpacked once, then one
/// vpdpbusd per token and zmm; the activation scales and group sums are
/// laid out token-minor so a group's eight scale products and min terms
/// are one vector operation each.
template <int Bits, bool SignedCodes, bool Symmetric, bool F16Scales, int Pairs>
MOEC_AVX512 void gemmRowsAvx512(const QuantMatrixView &w, const QuantizedActivation *x, int count, int64_t rowBegin,
                                int64_t rowEnd, float *y, int64_t ldy) {
  const QuantFormat &format = w.format;
  const int64_t groups = format.groupsPerRow(w.cols);
  const size_t rowBytes = format.rowBytes(w.cols), groupBytes = format.groupBytes(), headerBytes = format.headerBytes();
  constexpr size_t blockBytes = kBlock * Bits / 8;
  // Missing tokens read a zero activation (their results are dropped).
  thread_local std::vector<int8_t> zeros;
  thread_local std::vector<float> scalesT, sumsT;
  if (count < kGemmTokens)
    zeros.assign(static_cast<size_t>(groups * format.group), 0);
  scalesT.assign(static_cast<size_t>(groups * kGemmTokens), 0.0f);
  sumsT.assign(static_cast<size_t>(groups * kGemmTokens), 0.0f);
  const int8_t *activation[kGemmTokens];
  for (int t = 0; t < kGemmTokens; ++t) {
    activation[t] = t < count ? x[t].values.data() : zeros.data();
    if (t < count)
      for (int64_t g = 0; g < groups; ++g) {
        scalesT[g * kGemmTokens + t] = x[t].blockScales[g];
        sumsT[g * kGemmTokens + t] = x[t].groupSums[g];
      }
  }
  // Groups of 32: per pair of groups and token, the 16 lanes' activation
  // scales (the first group's in lanes 0..7, the second's in 8..15).
  thread_local std::vector<float> pairScales;
  if constexpr (Pairs == 0) {
    const int64_t pairs = (groups + 1) / 2;
    pairScales.assign(static_cast<size_t>(pairs * kGemmTokens * 16), 0.0f);
    for (int64_t p = 0; p < pairs; ++p)
      for (int t = 0; t < count; ++t)
        for (int lane = 0; lane < 16; ++lane) {
          const int64_t g = 2 * p + lane / 8;
          if (g < groups)
            pairScales[static_cast<size_t>((p * kGemmTokens + t) * 16 + lane)] = x[t].blockScales[g];
        }
  }
  // Plain pointers: a thread_local named in the loop is a call to the TLS
  // resolver for the compiler, which then keeps every zmm in memory.
  const float *const lanesOfPairs = pairScales.data(), *const tokenScales = scalesT.data(),
                     *const tokenSums = sumsT.data();
  // Eight named accumulators.
  const int8_t *const a0 = activation[0], *const a1 = activation[1], *const a2 = activation[2],
                      *const a3 = activation[3], *const a4 = activation[4], *const a5 = activation[5],
                      *const a6 = activation[6], *const a7 = activation[7];
#define MOEC_EIGHT_TOKENS(STEP) STEP(0) STEP(1) STEP(2) STEP(3) STEP(4) STEP(5) STEP(6) STEP(7)
  for (int64_t r = rowBegin; r < rowEnd; ++r) {
    const uint8_t *row = w.data + static_cast<size_t>(r) * rowBytes;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0, acc4 = acc0, acc5 = acc0, acc6 = acc0,
           acc7 = acc0;
    __m256 minTerms = _mm256_setzero_ps();
    if constexpr (Pairs == 0) {
      // Two groups per zmm; per token the lanes' activation scales come
      // precomputed (pairScales), so a token costs one load, vpdpbusd,
      // convert, multiply and fma per 64 codes.
      for (int64_t g = 0; g < groups; g += 2) {
        const bool pair = g + 1 < groups;
        const uint8_t *g0 = row + static_cast<size_t>(g) * groupBytes, *g1 = pair ? g0 + groupBytes : g0;
        float s0, m0, s1 = 0.0f, m1 = 0.0f;
        header512<Bits, SignedCodes, Symmetric, F16Scales>(g0, s0, m0);
        if (pair)
          header512<Bits, SignedCodes, Symmetric, F16Scales>(g1, s1, m1);
        if constexpr (!SignedCodes) {
          minTerms = _mm256_fmadd_ps(_mm256_set1_ps(m0), _mm256_loadu_ps(&tokenSums[g * kGemmTokens]), minTerms);
          if (pair)
            minTerms =
                _mm256_fmadd_ps(_mm256_set1_ps(m1), _mm256_loadu_ps(&tokenSums[(g + 1) * kGemmTokens]), minTerms);
        }
        const __m512 weightScales = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
        const __m512i codes = load64Codes<Bits>(g0 + headerBytes, g1 + headerBytes);
        const float *lanes = &lanesOfPairs[static_cast<size_t>(g / 2) * kGemmTokens * 16];
        // The odd last group reads only its own 32 activation bytes.
        const __mmask64 valid = pair ? ~0ULL : 0xffffffffULL;
#define MOEC_PAIR_STEP(T)                                                                                              \
  {                                                                                                                    \
    const __m512i sums =                                                                                               \
        dot512<SignedCodes>(_mm512_setzero_si512(), codes, _mm512_maskz_loadu_epi8(valid, a##T + g * kBlock));         \
    acc##T = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(weightScales, _mm512_loadu_ps(lanes + T * 16)),   \
                             acc##T);                                                                                  \
  }
        MOEC_EIGHT_TOKENS(MOEC_PAIR_STEP)
#undef MOEC_PAIR_STEP
      }
    } else {
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t *group = row + static_cast<size_t>(g) * groupBytes;
        float scale, min;
        header512<Bits, SignedCodes, Symmetric, F16Scales>(group, scale, min);
        const __m256 products = _mm256_mul_ps(_mm256_set1_ps(scale), _mm256_loadu_ps(&tokenScales[g * kGemmTokens]));
        if constexpr (!SignedCodes)
          minTerms = _mm256_fmadd_ps(_mm256_set1_ps(min), _mm256_loadu_ps(&tokenSums[g * kGemmTokens]), minTerms);
        const __m512 wide = _mm512_castps256_ps512(products);
        const __m512i codes0 = load64CodesContiguous<Bits>(group + headerBytes);
        const __m512i codes1 = Pairs == 2 ? load64CodesContiguous<Bits>(group + headerBytes + 2 * blockBytes) : codes0;
        const int64_t offset = g * 2 * kBlock * Pairs;
#define MOEC_GROUP_STEP(T)                                                                                             \
  {                                                                                                                    \
    __m512i sums = dot512<SignedCodes>(_mm512_setzero_si512(), codes0, _mm512_loadu_si512(a##T + offset));             \
    if constexpr (Pairs == 2)                                                                                          \
      sums = dot512<SignedCodes>(sums, codes1, _mm512_loadu_si512(a##T + offset + 2 * kBlock));                        \
    acc##T = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_permutexvar_ps(_mm512_set1_epi32(T), wide), acc##T);     \
  }
        MOEC_EIGHT_TOKENS(MOEC_GROUP_STEP)
#undef MOEC_GROUP_STEP
      }
    }
    // The eight sums (horizontal adds of the accumulators) plus min terms.
    alignas(32) float sums[kGemmTokens];
#define MOEC_SUM_STEP(T) sums[T] = _mm512_reduce_add_ps(acc##T);
    MOEC_EIGHT_TOKENS(MOEC_SUM_STEP)
#undef MOEC_SUM_STEP
    _mm256_store_ps(sums, _mm256_add_ps(_mm256_load_ps(sums), minTerms));
    for (int t = 0; t < count; ++t)
      y[t * ldy + (r - rowBegin)] = sums[t];
  }
#undef MOEC_EIGHT_TOKENS
}

/// The AVX-512 instantiation for w's format: Kernel<Bits, SignedCodes,
/// Symmetric, F16Scales, Pairs>::run(w, args...), two's complement codes
/// (Q8_0) as 8-bit symmetric fp16 groups of 32.
template <template <int, bool, bool, bool, int> class Kernel, int Bits, bool SignedCodes, bool Symmetric,
          bool F16Scales, typename... Args>
MOEC_AVX512 void dispatchByGroup(const QuantMatrixView &w, Args... args) {
  switch (w.format.group) {
  case 32:
    return Kernel<Bits, SignedCodes, Symmetric, F16Scales, 0>::run(w, args...);
  case 64:
    return Kernel<Bits, SignedCodes, Symmetric, F16Scales, 1>::run(w, args...);
  default:
    return Kernel<Bits, SignedCodes, Symmetric, F16Scales, 2>::run(w, args...);
  }
}

template <template <int, bool, bool, bool, int> class Kernel, int Bits, typename... Args>
MOEC_AVX512 void dispatchByScheme(const QuantMatrixView &w, Args... args) {
  const bool f16 = w.format.scaleType == ScaleType::F16;
  if (w.format.symmetric)
    return f16 ? dispatchByGroup<Kernel, Bits, false, true, true>(w, args...)
               : dispatchByGroup<Kernel, Bits, false, true, false>(w, args...);
  return f16 ? dispatchByGroup<Kernel, Bits, false, false, true>(w, args...)
             : dispatchByGroup<Kernel, Bits, false, false, false>(w, args...);
}

template <template <int, bool, bool, bool, int> class Kernel, typename... Args>
MOEC_AVX512 void dispatchAvx512(const QuantMatrixView &w, Args... args) {
  if (w.signedCodes)
    return Kernel<8, true, true, true, 0>::run(w, args...);
  switch (w.format.bits) {
  case 2:
    return dispatchByScheme<Kernel, 2>(w, args...);
  case 3:
    return dispatchByScheme<Kernel, 3>(w, args...);
  case 4:
    return dispatchByScheme<Kernel, 4>(w, args...);
  default:
    return dispatchByScheme<Kernel, 8>(w, args...);
  }
}

template <int Bits, bool SignedCodes, bool Symmetric, bool F16Scales, int Pairs> struct GemvAvx512 {
  MOEC_AVX512 static void run(const QuantMatrixView &w, const QuantizedActivation *x, int64_t rowBegin, int64_t rowEnd,
                              float *y) {
    gemvRowsAvx512<Bits, SignedCodes, Symmetric, F16Scales, Pairs>(w, *x, rowBegin, rowEnd, y);
  }
};

template <int Bits, bool SignedCodes, bool Symmetric, bool F16Scales, int Pairs> struct GemmAvx512 {
  MOEC_AVX512 static void run(const QuantMatrixView &w, const QuantizedActivation *x, int count, int64_t rowBegin,
                              int64_t rowEnd, float *y, int64_t ldy) {
    gemmRowsAvx512<Bits, SignedCodes, Symmetric, F16Scales, Pairs>(w, x, count, rowBegin, rowEnd, y, ldy);
  }
};

MOEC_AVX512 void gemmRowsAvx512Vnni(const QuantMatrixView &w, const QuantizedActivation *x, int count, int64_t rowBegin,
                                    int64_t rowEnd, float *y, int64_t ldy) {
  dispatchAvx512<GemmAvx512>(w, x, count, rowBegin, rowEnd, y, ldy);
}

MOEC_AVX512 void gemvRowsAvx512Vnni(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin,
                                    int64_t rowEnd, float *y) {
  dispatchAvx512<GemvAvx512>(w, &x, rowBegin, rowEnd, y);
}
#endif

bool useAvx512Vnni() {
#if defined(__x86_64__)
  static const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                                __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported;
#else
  return false;
#endif
}

bool useVnni() {
#if defined(__x86_64__)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avxvnni");
  return supported;
#else
  return false;
#endif
}

bool useAvx2() {
#if defined(__x86_64__)
  static const bool supported =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return supported;
#else
  return false;
#endif
}

} // namespace

namespace {

/// Sizes `out` for x[cols] at `group` (zeroed); returns the group count.
int64_t prepareActivation(int64_t cols, int group, QuantizedActivation &out) {
  const int64_t groups = (cols + group - 1) / group;
  out.cols = cols;
  out.group = group;
  out.values.assign(static_cast<size_t>(groups * group), 0);
  out.blockScales.assign(static_cast<size_t>(groups), 0.0f);
  out.groupSums.assign(static_cast<size_t>(groups), 0.0f);
  return groups;
}

#if defined(__x86_64__)
/// quantizeActivationScalar's arithmetic 16 values at a time: the same
/// absolute maximum, the same scale and inverse, the same product, and
/// lround's rounding (half away from zero) done exactly as trunc(|v|) plus
/// one when the exact fraction is at least a half.
/// The mask of the first min(count, 16) lanes.
inline __mmask16 firstOf16(int64_t count) {
  return count >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << count) - 1);
}

MOEC_AVX512 void quantizeActivationAvx512(const float *x, int64_t cols, int group, QuantizedActivation &out) {
  const int64_t groups = prepareActivation(cols, group, out);
  const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
  const __m512i signBit = _mm512_set1_epi32(static_cast<int32_t>(0x80000000u));
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * group, end = std::min<int64_t>(cols, begin + group);
    __m512 maximum = _mm512_setzero_ps();
    for (int64_t i = begin; i < end; i += 16) {
      const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(firstOf16(end - i), x + i));
      maximum = _mm512_max_ps(v, maximum);
    }
    const float absMax = _mm512_reduce_max_ps(maximum);
    const float scale = absMax / 127.0f, inverse = absMax > 0 ? 127.0f / absMax : 0.0f;
    out.blockScales[g] = scale;
    const __m512 factor = _mm512_set1_ps(inverse);
    __m512i sums = _mm512_setzero_si512();
    for (int64_t i = begin; i < end; i += 16) {
      const __mmask16 valid = firstOf16(end - i);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, x + i), factor);
      const __m512 magnitude = _mm512_abs_ps(v);
      const __m512 whole = _mm512_roundscale_ps(magnitude, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
      const __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(magnitude, whole), half, _CMP_GE_OQ);
      // The sign bit of v on the rounded magnitude (integer ops: AVX512F).
      const __m512 rounded =
          _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(_mm512_mask_add_ps(whole, up, whole, one)),
                                              _mm512_and_si512(_mm512_castps_si512(v), signBit)));
      const __m512i q = _mm512_cvttps_epi32(rounded);
      sums = _mm512_add_epi32(sums, q);
      _mm_mask_storeu_epi8(out.values.data() + i, valid, _mm512_cvtepi32_epi8(q));
    }
    out.groupSums[g] = static_cast<float>(_mm512_reduce_add_epi32(sums)) * scale;
  }
}
#endif

} // namespace

void quantizeActivationScalar(const float *x, int64_t cols, int group, QuantizedActivation &out) {
  // One scale per weight group (as llama.cpp's Q8_K uses one per 256), so
  // a group's integer products add up in int32 before one float multiply.
  const int64_t groups = prepareActivation(cols, group, out);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * group, end = std::min<int64_t>(cols, begin + group);
    float absMax = 0.0f;
    for (int64_t i = begin; i < end; ++i)
      absMax = std::max(absMax, std::fabs(x[i]));
    const float scale = absMax / 127.0f, inverse = absMax > 0 ? 127.0f / absMax : 0.0f;
    out.blockScales[g] = scale;
    int32_t sum = 0;
    for (int64_t i = begin; i < end; ++i) {
      out.values[i] = static_cast<int8_t>(std::lround(x[i] * inverse));
      sum += out.values[i];
    }
    // The sum of the quantized activation, so that the kernel computes
    // exactly w^ . x^ and its error is that of x^ alone.
    out.groupSums[g] = static_cast<float>(sum) * scale;
  }
}

void quantizeActivation(const float *x, int64_t cols, int group, QuantizedActivation &out) {
#if defined(__x86_64__)
  if (useAvx512Vnni())
    return quantizeActivationAvx512(x, cols, group, out);
#endif
  quantizeActivationScalar(x, cols, group, out);
}

void gemvRowsScalar(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin, int64_t rowEnd,
                    float *y) {
  const QuantFormat &format = w.format;
  const int64_t groups = format.groupsPerRow(w.cols);
  const int blocksPerGroup = format.group / kBlock;
  uint8_t codes[32];
  for (int64_t r = rowBegin; r < rowEnd; ++r) {
    const uint8_t *row = w.data + static_cast<size_t>(r) * format.rowBytes(w.cols);
    float total = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t *group = row + static_cast<size_t>(g) * format.groupBytes();
      float scale, min;
      groupHeader(format, group, scale, min);
      if (w.signedCodes)
        min = 0.0f;
      int32_t sum = 0;
      for (int b = 0; b < blocksPerGroup; ++b) {
        unpack32(group + format.headerBytes(), format.bits, b, codes);
        const int8_t *values = x.values.data() + g * format.group + b * kBlock;
        for (int i = 0; i < kBlock; ++i)
          sum +=
              (w.signedCodes ? static_cast<int32_t>(static_cast<int8_t>(codes[i])) : static_cast<int32_t>(codes[i])) *
              values[i];
      }
      total += static_cast<float>(sum) * x.blockScales[g] * scale + min * x.groupSums[g];
    }
    y[r - rowBegin] = total;
  }
}

void gemmRows(const QuantMatrixView &w, const QuantizedActivation *x, int64_t count, int64_t rowBegin, int64_t rowEnd,
              float *y, int64_t ldy) {
#if defined(__x86_64__)
  if (useAvx512Vnni()) {
    for (int64_t first = 0; first < count; first += kGemmTokens)
      gemmRowsAvx512Vnni(w, x + first, static_cast<int>(std::min<int64_t>(kGemmTokens, count - first)), rowBegin,
                         rowEnd, y + first * ldy, ldy);
    return;
  }
#endif
  // Elsewhere: the decode kernel token by token.
  thread_local std::vector<float> perThread;
  std::vector<float> &column = perThread;
  column.resize(static_cast<size_t>(rowEnd - rowBegin));
  for (int64_t t = 0; t < count; ++t) {
    gemvRows(w, x[t], rowBegin, rowEnd, column.data());
    std::copy(column.begin(), column.end(), y + t * ldy);
  }
}

void gemvRows(const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin, int64_t rowEnd, float *y) {
#if defined(__x86_64__)
  if (useAvx512Vnni())
    return gemvRowsAvx512Vnni(w, x, rowBegin, rowEnd, y);
  if (useVnni())
    return gemvRowsVnni(w, x, rowBegin, rowEnd, y);
  if (useAvx2())
    return gemvRowsAvx2(w, x, rowBegin, rowEnd, y);
#endif
  gemvRowsScalar(w, x, rowBegin, rowEnd, y);
}

void dequantizeRows(const QuantMatrixView &w, int64_t rowBegin, int64_t rowEnd, float *out) {
  // Block-wise unpacking (the reference goes code by code); same values.
  const QuantFormat &format = w.format;
  const int64_t groups = format.groupsPerRow(w.cols), cols = w.cols;
  const int blocksPerGroup = format.group / kBlock;
  uint8_t codes[kBlock];
  for (int64_t r = rowBegin; r < rowEnd; ++r) {
    const uint8_t *row = w.data + static_cast<size_t>(r) * format.rowBytes(cols);
    float *target = out + (r - rowBegin) * cols;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t *group = row + static_cast<size_t>(g) * format.groupBytes();
      float scale, min;
      groupHeader(format, group, scale, min);
      if (w.signedCodes)
        min = 0.0f;
      for (int b = 0; b < blocksPerGroup; ++b) {
        const int64_t first = g * format.group + b * kBlock;
        if (first >= cols)
          break;
        unpack32(group + format.headerBytes(), format.bits, b, codes);
        const int64_t count = std::min<int64_t>(kBlock, cols - first);
        for (int64_t i = 0; i < count; ++i)
          target[first + i] =
              static_cast<float>(w.signedCodes ? static_cast<int8_t>(codes[i]) : static_cast<int>(codes[i])) * scale +
              min;
      }
    }
  }
}

const char *kernelIsa() { return availableIsas().front(); }

void gemvRowsWithIsa(const char *isa, const QuantMatrixView &w, const QuantizedActivation &x, int64_t rowBegin,
                     int64_t rowEnd, float *y) {
#if defined(__x86_64__)
  if (std::strcmp(isa, "avx512-vnni") == 0 && useAvx512Vnni())
    return gemvRowsAvx512Vnni(w, x, rowBegin, rowEnd, y);
  if (std::strcmp(isa, "avx-vnni") == 0 && useVnni())
    return gemvRowsVnni(w, x, rowBegin, rowEnd, y);
  if (std::strcmp(isa, "avx2") == 0 && useAvx2())
    return gemvRowsAvx2(w, x, rowBegin, rowEnd, y);
#endif
  gemvRowsScalar(w, x, rowBegin, rowEnd, y);
}

std::vector<const char *> availableIsas() {
  std::vector<const char *> isas;
  if (useAvx512Vnni())
    isas.push_back("avx512-vnni");
  if (useVnni())
    isas.push_back("avx-vnni");
  if (useAvx2())
    isas.push_back("avx2");
  isas.push_back("scalar");
  return isas;
}

} // namespace moe::quant
