//===- QuantKernels.cpp - CPU kernels over group-wise integer weights -----===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "cpu/QuantKernels.h"

#include "common/RowTiles.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

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

/// Tokens per pass of the integer GEMM: a tile's lines are read once per
/// pass and dotted with this many activations (eight int32 and eight float
/// accumulators stay in registers).
constexpr int kGemmTokens = 8;

/// Products by row tiles (AVX-512 VNNI), in the layout of common/RowTiles.h:
/// prefill lays out each tile of 16 rows once per call (unless the matrix
/// carries tiles made at load), then one vpdpbusd against a token's four
/// activation bytes, broadcast from memory, adds four codes of 16 rows, and
/// each group's int32 sums cost a convert and two multiply-adds per token
/// for 16 rows, where the per-row kernel paid the header per row. Tokens go
/// eight at a time with the tile in cache; the next tile's bytes are
/// prefetched during the products. Decode runs the same product for one
/// token when the matrix carries tiles.

/// The 16 x 16 transpose of 32-bit elements: out[c] lane i = in[i] lane c.
MOEC_AVX512 inline void transpose16x16(__m512i (&v)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  // u[4q + j], per 128-bit lane L: rows 4q .. 4q + 3, column 4L + j.
  __m512i u[16];
  for (int q = 0; q < 4; ++q) {
    const __m512i *p = t + 4 * q;
    u[4 * q + 0] = _mm512_unpacklo_epi64(p[0], p[2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(p[0], p[2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(p[1], p[3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(p[1], p[3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i even = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), odd = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
    const __m512i evenHigh = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88),
                  oddHigh = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
    v[j] = _mm512_shuffle_i32x4(even, evenHigh, 0x88);
    v[8 + j] = _mm512_shuffle_i32x4(even, evenHigh, 0xdd);
    v[4 + j] = _mm512_shuffle_i32x4(odd, oddHigh, 0x88);
    v[12 + j] = _mm512_shuffle_i32x4(odd, oddHigh, 0xdd);
  }
}

/// f(std::integral_constant<int, bits>{}) for a group format's code width.
template <typename F> MOEC_AVX512 inline void byWidth(int bits, F &&f) {
  switch (bits) {
  case 2:
    return f(std::integral_constant<int, 2>{});
  case 3:
    return f(std::integral_constant<int, 3>{});
  case 4:
    return f(std::integral_constant<int, 4>{});
  default:
    return f(std::integral_constant<int, 8>{});
  }
}

/// Lays out rows [first, first + valid) of w (valid <= 16) as the tile at
/// `out`, rows past `valid` zero: packRowTilesReference's bytes.
template <int Bits>
MOEC_AVX512 void layOutTile(const QuantMatrixView &w, const RowTileLayout &layout, int64_t first, int valid,
                            uint8_t *out) {
  const QuantFormat &format = w.format;
  const int64_t groups = layout.groups;
  const size_t rowBytes = format.rowBytes(w.cols), groupBytes = format.groupBytes(), headerBytes = format.headerBytes();
  constexpr size_t blockBytes = kBlock * Bits / 8;
  const int blocksPerGroup = format.group / kBlock;
  const int64_t blocks = groups * blocksPerGroup;
  const uint8_t *base = w.data + static_cast<size_t>(first) * rowBytes;
  const __mmask16 rows = static_cast<__mmask16>((1u << valid) - 1);
  // Headers: one gather of the 16 rows' first header words per group.
  const __m512i rowOffsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(static_cast<int32_t>(rowBytes)));
  for (int64_t g = 0; g < groups; ++g) {
    const __m512i words =
        _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), rows, rowOffsets, base + g * groupBytes, 1);
    uint8_t *header = out + static_cast<size_t>(g) * layout.groupStride;
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(header), _mm512_cvtepi32_epi16(words));
    if (!format.symmetric)
      _mm256_storeu_si256(reinterpret_cast<__m256i *>(header + 32),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(words, 16)));
  }
  // Codes: each row's stream of group words (64 stored bytes, or two 3-bit
  // blocks unpacked, per step), transposed into 16 lines, line j of the
  // stream going to its group's line j % linesPerGroup.
  auto block = [&](const uint8_t *row, int64_t b) {
    if (b >= blocks)
      b = 0; // past the last block: lines never stored
    return row + static_cast<size_t>(b / blocksPerGroup) * groupBytes + headerBytes +
           static_cast<size_t>(b % blocksPerGroup) * blockBytes;
  };
  constexpr bool stored = Bits != 3;
  constexpr int64_t blocksPerStep = stored ? 64 / blockBytes : 2;
  // Stored bytes come in pieces of a group's codes, at most 64 contiguous.
  const size_t piece = std::min<size_t>(64, static_cast<size_t>(blocksPerGroup) * blockBytes);
  const int64_t blocksPerPiece = static_cast<int64_t>(piece / blockBytes);
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(w.signedCodes ? 0x80 : 0));
  const int64_t lines = groups * layout.linesPerGroup;
  for (int64_t b = 0, line = 0; b < blocks; b += blocksPerStep, line += 16) {
    __m512i v[16];
    for (int i = 0; i < kTileRows; ++i) {
      if (i >= valid) {
        v[i] = _mm512_setzero_si512();
        continue;
      }
      const uint8_t *row = base + static_cast<size_t>(i) * rowBytes;
      if constexpr (stored) {
        auto at = [&](int k) { return block(row, b + k * blocksPerPiece); };
        if (piece == 64) {
          v[i] = _mm512_loadu_si512(at(0));
        } else if (piece == 32) {
          v[i] =
              _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(at(0)))),
                                 _mm256_loadu_si256(reinterpret_cast<const __m256i *>(at(1))), 1);
        } else if (piece == 16) {
          v[i] = _mm512_inserti64x4(
              _mm512_castsi256_si512(_mm256_loadu2_m128i(reinterpret_cast<const __m128i *>(at(1)),
                                                         reinterpret_cast<const __m128i *>(at(0)))),
              _mm256_loadu2_m128i(reinterpret_cast<const __m128i *>(at(3)), reinterpret_cast<const __m128i *>(at(2))),
              1);
        } else {
          int64_t q[8];
          for (int k = 0; k < 8; ++k)
            std::memcpy(&q[k], at(k), 8);
          v[i] = _mm512_loadu_si512(q);
        }
        v[i] = _mm512_xor_si512(v[i], offset);
      } else {
        v[i] = load64Codes<Bits>(block(row, b), block(row, b + 1));
      }
    }
    transpose16x16(v);
    for (int c = 0; c < 16 && line + c < lines; ++c) {
      const int64_t g = (line + c) / layout.linesPerGroup, k = (line + c) % layout.linesPerGroup;
      _mm512_storeu_si512(out + static_cast<size_t>(g) * layout.groupStride + layout.headerBytes + 64 * k, v[c]);
    }
  }
}

/// How a tile's 16-bit headers become scales and mins.
struct TileHeaders {
  bool f16 = true, symmetric = true;
  float zeroMin = 0; ///< A symmetric format's min / scale: minus its zero point.
};

TileHeaders tileHeaders(const QuantMatrixView &w) {
  return {w.format.scaleType == ScaleType::F16, w.format.symmetric,
          w.signedCodes ? -128.0f : -static_cast<float>(w.format.zeroPoint())};
}

MOEC_AVX512 inline __m512 headerFloats(const uint8_t *at, bool f16) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(at));
  return f16 ? _mm512_cvtph_ps(bits) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

/// Tokens as the tile product reads them: per 4-code chunk in the tiles'
/// line order, the T tokens' four activation bytes side by side ([chunk]
/// [token] int32), then per group the T scales and T sums.
struct PackedTokens {
  const int32_t *values;
  const float *scales, *sums;
};

/// Bytes to bring into the cache while a product runs (the next tile).
struct Prefetch {
  const uint8_t *bytes = nullptr;
  size_t size = 0;
};

/// y[t * ldy + (i - lo)] = row i of the tile . x_t for t < T and rows
/// lo <= i < hi of the tile, PerLine chunks per line, each group's lines
/// summed in Chains independent int32 sums (it must divide the lines per
/// group); `next` is prefetched a slice per group.
template <int T, int PerLine, int Chains>
MOEC_AVX512 void tileProduct(const uint8_t *tile, const RowTileLayout &layout, TileHeaders headers,
                             const PackedTokens &x, float *y, int64_t ldy, int lo, int hi, Prefetch next) {
  const int64_t groups = layout.groups;
  const int lines = layout.linesPerGroup;
  const size_t linesPerGroup = (next.size / 64 + static_cast<size_t>(groups) - 1) / static_cast<size_t>(groups);
  // Few tokens leave few independent chains: then lines alternate between
  // int32 sums, and the min terms go to their own float sums.
  constexpr bool SplitMins = T < 4;
  __m512 acc[T], mins[T];
  for (int t = 0; t < T; ++t)
    acc[t] = mins[t] = _mm512_setzero_ps();
  const int32_t *values = x.values;
  const __m512i field = _mm512_set1_epi8(static_cast<char>((1 << (8 / PerLine)) - 1));
  const __m512 zeroMin = _mm512_set1_ps(headers.zeroMin);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t *group = tile + static_cast<size_t>(g) * layout.groupStride;
    const uint8_t *line = group + layout.headerBytes;
    __m512i dot[Chains][T];
    for (int c = 0; c < Chains; ++c)
      for (int t = 0; t < T; ++t)
        dot[c][t] = _mm512_setzero_si512();
    for (int k = 0; k < lines; k += Chains)
#pragma GCC unroll 4
      for (int c = 0; c < Chains; ++c, line += 64) {
        const __m512i codes = _mm512_loadu_si512(line);
#pragma GCC unroll 4
        for (int f = 0; f < PerLine; ++f, values += T) {
          const __m512i chunk =
              PerLine == 1 ? codes : _mm512_and_si512(_mm512_srli_epi16(codes, f * (8 / PerLine)), field);
#pragma GCC unroll 16
          for (int t = 0; t < T; ++t)
            dot[c][t] = _mm512_dpbusd_epi32(dot[c][t], chunk, _mm512_set1_epi32(values[t]));
        }
      }
    for (size_t i = 0; i < linesPerGroup; ++i) {
      const size_t offset = (static_cast<size_t>(g) * linesPerGroup + i) * 64;
      if (offset < next.size)
        _mm_prefetch(reinterpret_cast<const char *>(next.bytes + offset), _MM_HINT_T1);
    }
    const __m512 scale = headerFloats(group, headers.f16);
    const __m512 min = headers.symmetric ? _mm512_mul_ps(scale, zeroMin) : headerFloats(group + 32, headers.f16);
    const float *tokenScales = x.scales + g * T, *tokenSums = x.sums + g * T;
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      __m512i sums = dot[0][t];
      for (int c = 1; c < Chains; ++c)
        sums = _mm512_add_epi32(sums, dot[c][t]);
      acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(tokenScales[t])), scale, acc[t]);
      if constexpr (SplitMins)
        mins[t] = _mm512_fmadd_ps(min, _mm512_set1_ps(tokenSums[t]), mins[t]);
      else
        acc[t] = _mm512_fmadd_ps(min, _mm512_set1_ps(tokenSums[t]), acc[t]);
    }
  }
  if constexpr (SplitMins)
    for (int t = 0; t < T; ++t)
      acc[t] = _mm512_add_ps(acc[t], mins[t]);
  // Lanes lo .. hi - 1 moved down to 0 .. hi - lo - 1.
  const __mmask16 keep = static_cast<__mmask16>((1u << (hi - lo)) - 1);
  const __m512i from =
      _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(lo));
  for (int t = 0; t < T; ++t)
    _mm512_mask_storeu_ps(y + t * ldy, keep, lo ? _mm512_permutexvar_ps(from, acc[t]) : acc[t]);
}

using TileProduct = void (*)(const uint8_t *, const RowTileLayout &, TileHeaders, const PackedTokens &, float *,
                             int64_t, int, int, Prefetch);
/// Per token count: two chains below four tokens (lines per group are even
/// for every format), else one.
template <int PerLine>
constexpr TileProduct kTileProducts[kGemmTokens] = {
    tileProduct<1, PerLine, 2>, tileProduct<2, PerLine, 2>, tileProduct<3, PerLine, 2>, tileProduct<4, PerLine, 1>,
    tileProduct<5, PerLine, 1>, tileProduct<6, PerLine, 1>, tileProduct<7, PerLine, 1>, tileProduct<8, PerLine, 1>};
/// One token over groups of four lines or more (a multiple of four): four
/// chains, as a group of 128 4-bit codes is 32 dependent vpdpbusd.
template <int PerLine> constexpr TileProduct kOneTokenLongGroups = tileProduct<1, PerLine, 4>;

/// Products over rows [rowBegin, rowEnd) for `count` tokens: the tokens
/// packed once, then per tile one layout pass (none with tiles made at
/// load) and a product per eight tokens.
template <int Bits>
MOEC_AVX512 void tiledProducts(const QuantMatrixView &w, const QuantizedActivation *x, int64_t count, int64_t rowBegin,
                               int64_t rowEnd, float *y, int64_t ldy) {
  constexpr int perLine = tileChunksPerLine(Bits);
  const QuantFormat &format = w.format;
  const RowTileLayout layout = rowTileLayout(format, w.rows, w.cols);
  const int64_t groups = layout.groups, chunks = groups * format.group / 4;
  const size_t rowBytes = format.rowBytes(w.cols);
  thread_local std::vector<int32_t> packedValues;
  thread_local std::vector<float> packedFloats;
  thread_local std::vector<uint8_t> tileBuffer;
  packedValues.resize(static_cast<size_t>(count * chunks));
  packedFloats.resize(static_cast<size_t>(2 * count * groups));
  if (!w.tiles)
    tileBuffer.resize(layout.tileBytes + 64);
  // Pointers taken once: a thread_local named in a loop is a TLS call.
  int32_t *const values = packedValues.data();
  float *const floats = packedFloats.data();
  uint8_t *const buffer =
      reinterpret_cast<uint8_t *>((reinterpret_cast<uintptr_t>(tileBuffer.data()) + 63) & ~uintptr_t(63));
  // Tokens in passes of eight: a pass's values chunk-major in the tiles'
  // line order, then its scales and sums group-major.
  for (int64_t first = 0; first < count; first += kGemmTokens) {
    const int n = static_cast<int>(std::min<int64_t>(kGemmTokens, count - first));
    int32_t *v = values + first * chunks;
    float *scales = floats + 2 * first * groups, *sums = scales + n * groups;
    for (int t = 0; t < n; ++t) {
      const int32_t *source = reinterpret_cast<const int32_t *>(x[first + t].values.data());
      for (int64_t c = 0; c < chunks; ++c)
        v[tileLinePosition(Bits, c) * n + t] = source[c];
      for (int64_t g = 0; g < groups; ++g) {
        scales[g * n + t] = x[first + t].blockScales[g];
        sums[g * n + t] = x[first + t].groupSums[g];
      }
    }
  }
  const TileHeaders headers = tileHeaders(w);
  for (int64_t tile = rowBegin / kTileRows; tile * kTileRows < rowEnd; ++tile) {
    const int64_t r0 = tile * kTileRows;
    const int lo = static_cast<int>(std::max<int64_t>(rowBegin - r0, 0)),
              hi = static_cast<int>(std::min<int64_t>(rowEnd - r0, kTileRows));
    const uint8_t *bytes = buffer;
    Prefetch next;
    const bool more = r0 + kTileRows < rowEnd;
    if (w.tiles) {
      bytes = w.tiles + static_cast<size_t>(tile) * layout.tileBytes;
      // Several passes over a tile: the next one's bytes come in meanwhile
      // (one token streams them faster on the hardware prefetcher alone).
      if (more && count > 1)
        next = {bytes + layout.tileBytes, layout.tileBytes};
    } else {
      layOutTile<Bits>(w, layout, r0, static_cast<int>(std::min<int64_t>(kTileRows, w.rows - r0)), buffer);
      if (more)
        next = {w.data + static_cast<size_t>(r0 + kTileRows) * rowBytes,
                static_cast<size_t>(std::min<int64_t>(kTileRows, w.rows - r0 - kTileRows)) * rowBytes};
    }
    for (int64_t first = 0; first < count; first += kGemmTokens) {
      const int n = static_cast<int>(std::min<int64_t>(kGemmTokens, count - first));
      const float *scales = floats + 2 * first * groups;
      const PackedTokens tokens{values + first * chunks, scales, scales + n * groups};
      const TileProduct product =
          n == 1 && layout.linesPerGroup % 4 == 0 ? kOneTokenLongGroups<perLine> : kTileProducts<perLine>[n - 1];
      product(bytes, layout, headers, tokens, y + first * ldy + (r0 + lo - rowBegin), ldy, lo, hi,
              first == 0 ? next : Prefetch{});
    }
  }
}

MOEC_AVX512 void tiledProductsAvx512(const QuantMatrixView &w, const QuantizedActivation *x, int64_t count,
                                     int64_t rowBegin, int64_t rowEnd, float *y, int64_t ldy) {
  byWidth(w.format.bits,
          [&](auto bits) { tiledProducts<decltype(bits)::value>(w, x, count, rowBegin, rowEnd, y, ldy); });
}

MOEC_AVX512 void packRowTilesAvx512(const QuantMatrixView &w, uint8_t *out) {
  const RowTileLayout layout = rowTileLayout(w.format, w.rows, w.cols);
  byWidth(w.format.bits, [&](auto bits) {
    for (int64_t tile = 0; tile < layout.tiles; ++tile) {
      const int64_t r0 = tile * kTileRows;
      layOutTile<decltype(bits)::value>(w, layout, r0, static_cast<int>(std::min<int64_t>(kTileRows, w.rows - r0)),
                                        out + static_cast<size_t>(tile) * layout.tileBytes);
    }
  });
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
  if (useAvx512Vnni())
    return tiledProductsAvx512(w, x, count, rowBegin, rowEnd, y, ldy);
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
  if (w.tiles && useAvx512Vnni())
    return tiledProductsAvx512(w, &x, 1, rowBegin, rowEnd, y, 0);
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

bool rowTilesHelp(const QuantFormat &format) {
  // 8-bit decode reads its stored rows faster (tiles at 0.8-0.9x in
  // bench/quant_kernels); 3-bit tiles would be larger than the codes.
  return useAvx512Vnni() && (format.bits == 2 || format.bits == 4);
}

void packRowTiles(const QuantMatrixView &w, uint8_t *out) {
#if defined(__x86_64__)
  if (useAvx512Vnni())
    return packRowTilesAvx512(w, out);
#endif
  packRowTilesReference(w.format, w.signedCodes, w.data, w.rows, w.cols, out);
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
