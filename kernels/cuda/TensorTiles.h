//===- TensorTiles.h - Group-format products of many tokens on int8 tensor cores -*- C++ -*-===//
//
// Part of moec. The kernel of products over 16 tokens or more (prefill:
// each expert over the tokens routed to it, q/k/v over the prompt) when the
// matrix is in a group format. A warp computes a tile of kTokens tokens by
// kRows rows with the int8 tensor cores' mma.sync.m16n8k32 (sm_80 and
// later): the activation, rounded to int8 per group as for every product
// (quantizeKernel, the CPU's arithmetic), is the A operand; the planar
// codes of a 32-code block (common/GroupPlanes.h), unsigned bytes (signed
// for ggml's Q8_0), are the B operand. The integer sums of a whole group
// add up in the MMA's int32 accumulators, exact, and then each output takes
//   sum * activation scale * weight scale + weight min * activation sum
// once per group, groups in order, each product and sum rounded on its own:
// the CPU scalar kernel's arithmetic (quant::gemvRowsScalar), where the
// one-token kernels add 32-code blocks across lanes instead.
//
// The warp's work is written once, for the device and the host: the MMA
// is a policy, which on the device is the instruction and in the CPU's
// tests (tests/unit/TensorTilesTest.cpp, and the CPU emulation of CUDA)
// referenceMma over the fragments the 32 lanes exchange. Every loop is
// uniform across the warp (tokens and rows past the tile's end load
// zeros), as mma.sync requires.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_CUDA_TENSORTILES_H
#define MOE_KERNELS_CUDA_TENSORTILES_H

#include "common/QuantFormat.h"
#include "cuda/RoutedExperts.h"

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace moe::cuda::tensor {

constexpr int kTokenTiles = 4;            ///< 16-token MMA tiles of a warp (M).
constexpr int kRowTiles = 2;              ///< 8-row MMA tiles of a warp (N).
constexpr int kTokens = 16 * kTokenTiles; ///< Tokens of a warp's tile.
constexpr int kRows = 8 * kRowTiles;      ///< Rows of a warp's tile.
/// Products of fewer tokens keep the dp4a kernel: a tile of 64 tokens
/// would mostly multiply zeros.
constexpr int64_t kMinTokens = 16;

/// mma.m16n8k32.row.col with 8-bit integers as the PTX ISA defines it, for
/// running a warp's code without tensor cores (TensorTilesTest, the CPU
/// emulation of CUDA): lane `lane`'s accumulators d += A B, from every
/// lane's A registers `a` and B registers `b`. The fragments (groupID =
/// lane / 4, threadID_in_group = lane % 4):
///   A (16 x 32, row): register r of a lane holds 4 bytes of row
///     groupID + 8 * (r % 2), columns threadID_in_group * 4 + 16 * (r / 2) + 0..3;
///   B (32 x 8, col): register r holds 4 bytes of column groupID, rows
///     threadID_in_group * 4 + 16 * r + 0..3;
///   C/D (16 x 8): element i of a lane is row groupID + 8 * (i / 2), column
///     threadID_in_group * 2 + i % 2.
/// A is signed; B unsigned, or signed with `signedCodes` (Q8_0).
inline void referenceMma(int (&d)[4], int lane, const unsigned (*a)[4], const unsigned (*b)[2], bool signedCodes) {
  const auto byteOf = [](unsigned word, int index, bool isSigned) {
    const unsigned byte = (word >> (8 * index)) & 0xFFu;
    return isSigned ? static_cast<int>(static_cast<int8_t>(byte)) : static_cast<int>(byte);
  };
  for (int i = 0; i < 4; ++i) {
    const int row = lane / 4 + 8 * (i / 2), col = (lane % 4) * 2 + i % 2;
    for (int k = 0; k < 32; ++k) {
      const int aValue = byteOf(a[(row % 8) * 4 + (k % 16) / 4][row / 8 + 2 * (k / 16)], k % 4, true);
      const int bValue = byteOf(b[col * 4 + (k % 16) / 4][k / 16], k % 4, signedCodes);
      d[i] += aValue * bValue;
    }
  }
}

/// Warps (tiles) that cover a job.
MOE_HOST_DEVICE inline int64_t tileCount(int64_t rows, int64_t tokens) {
  return ((rows + kRows - 1) / kRows) * ((tokens + kTokens - 1) / kTokens);
}

/// Tile `tile` of a job of `rows` rows: its first token and row. Tiles
/// run along the rows first, so a block's warps read the same tokens.
struct TileOrigin {
  int64_t token, row;
};
MOE_HOST_DEVICE inline TileOrigin tileOrigin(int64_t rows, int64_t tile) {
  const int64_t rowTiles = (rows + kRows - 1) / kRows;
  return {(tile / rowTiles) * kTokens, (tile % rowTiles) * kRows};
}

/// A 32-bit word at a 4-byte-aligned address.
MOE_HOST_DEVICE inline unsigned loadWord(const void *p) {
#if defined(__CUDA_ARCH__)
  return __ldg(static_cast<const unsigned *>(p));
#else
  unsigned word;
  std::memcpy(&word, p, 4);
  return word;
#endif
}

/// A 16-bit word at a 2-byte-aligned address.
MOE_HOST_DEVICE inline unsigned short loadShort(const void *p) {
#if defined(__CUDA_ARCH__)
  return __ldg(static_cast<const unsigned short *>(p));
#else
  unsigned short word;
  std::memcpy(&word, p, 2);
  return word;
#endif
}

/// A 16-bit group header field as a float.
MOE_HOST_DEVICE inline float headerValue(unsigned short bits, bool bf16) {
#if defined(__CUDA_ARCH__)
  return bf16 ? __uint_as_float(static_cast<unsigned>(bits) << 16) : __half2float(__ushort_as_half(bits));
#else
  return quant::scaleToFloat(bits, bf16 ? quant::ScaleType::BF16 : quant::ScaleType::F16);
#endif
}

/// Lane `lane`'s A fragment of one 32-code block: the int8 activations of
/// tokens g and g + 8 of the 16-token tile at `token0` (g = lane / 4), at
/// columns 4t .. 4t + 3 and 16 + 4t .. 16 + 4t + 3 of the block (t = lane %
/// 4), in registers (g, 4t), (g + 8, 4t), (g, 16 + 4t), (g + 8, 16 + 4t).
/// `q` holds [tokens, stride] bytes; `column` is the block's first column.
MOE_HOST_DEVICE inline void activationFragment(const int8_t *q, int64_t stride, int64_t tokens, int64_t token0,
                                               int64_t column, int lane, unsigned (&a)[4]) {
  const int g = lane >> 2, t = lane & 3;
  for (int r = 0; r < 4; ++r) {
    const int64_t token = token0 + g + 8 * (r & 1);
    a[r] = token < tokens ? loadWord(q + token * stride + column + 4 * t + 16 * (r >> 1)) : 0u;
  }
}

/// Word m (codes 4m .. 4m + 3 as bytes) of a planar block of BITS-bit
/// codes (kernels/common/QuantFormat.h) whose first packed words are
/// `low` (word m % 2 of the block, for 2 and 3 bits; word m % 4 for 4 bits;
/// word m for 8 bits) and, for 3 bits, `high` (the block's word 2, the
/// codes' third bits).
template <int BITS> MOE_HOST_DEVICE inline unsigned planarWord(unsigned low, unsigned high, int m) {
  if constexpr (BITS == 8) {
    return low;
  } else if constexpr (BITS == 4) {
    return m < 4 ? low & 0x0F0F0F0Fu : (low >> 4) & 0x0F0F0F0Fu;
  } else {
    // Byte i of the first eight holds code i + 8s at bits 2s; for 3 bits,
    // bit (j % 8) of byte 8 + j / 8 is code j's third bit.
    const int s = m >> 1, k = m & 1;
    unsigned value = (low >> (2 * s)) & 0x03030303u;
    if constexpr (BITS == 3) {
      const unsigned n = (high >> (8 * s + 4 * k)) & 0xFu;
      const unsigned spread = (n & 1u) | ((n & 2u) << 7) | ((n & 4u) << 14) | ((n & 8u) << 21);
      value |= spread << 2;
    }
    return value;
  }
}

/// Lane t's (t = lane % 4) B fragment of one row's 32-code block at
/// `block`: codes 4t .. 4t + 3 and 16 + 4t .. 16 + 4t + 3, a byte each.
template <int BITS> MOE_HOST_DEVICE inline void codeFragment(const uint8_t *block, int t, unsigned (&b)[2]) {
  if constexpr (BITS == 8) {
    b[0] = loadWord(block + 4 * t);
    b[1] = loadWord(block + 16 + 4 * t);
  } else if constexpr (BITS == 4) {
    const unsigned word = loadWord(block + 4 * t);
    b[0] = planarWord<4>(word, 0, t);
    b[1] = planarWord<4>(word, 0, 4 + t);
  } else {
    const unsigned low = loadWord(block + 4 * (t & 1));
    const unsigned high = BITS == 3 ? loadWord(block + 8) : 0u;
    b[0] = planarWord<BITS>(low, high, t);
    b[1] = planarWord<BITS>(low, high, 4 + t);
  }
}

/// The token and row (within a 16 x 8 MMA tile) of a lane's accumulator i.
MOE_HOST_DEVICE inline int accumulatorToken(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
MOE_HOST_DEVICE inline int accumulatorRow(int lane, int i) { return 2 * (lane & 3) + (i & 1); }

/// Tile `tile` of a group-format job: y[token, row] for the tile's tokens
/// and rows. `mma(d, a, b, signedCodes)` is d += a b over one 16 x 8 x 32
/// step (mma.sync.m16n8k32.row.col.s32.s8.{u8,s8}.s32), called by all 32
/// lanes together.
template <int BITS, typename Mma>
MOE_HOST_DEVICE void tensorTile(const ProductJob &job, int64_t tile, int lane, Mma &mma) {
  const TileOrigin origin = tileOrigin(job.rows, tile);
  const int g = lane >> 2, t = lane & 3;
  const int blocksPerGroup = 1 << job.blockShift;
  const int64_t stride = job.groups * job.group;
  const uint8_t *headers = job.w + job.headerOffset;
  const int headerBytes = job.symmetric ? 2 : 4;
  const float symmetricMin = -static_cast<float>(1 << (BITS - 1));
  float acc[kTokenTiles][kRowTiles][4] = {};
  for (int64_t group = 0; group < job.groups; ++group) {
    int sums[kTokenTiles][kRowTiles][4] = {};
    for (int k = 0; k < blocksPerGroup; ++k) {
      const int64_t block = (group << job.blockShift) + k;
      unsigned a[kTokenTiles][4], b[kRowTiles][2];
      for (int mt = 0; mt < kTokenTiles; ++mt)
        activationFragment(job.q, stride, job.tokens, origin.token + 16 * mt, block * 32, lane, a[mt]);
      for (int nt = 0; nt < kRowTiles; ++nt) {
        const int64_t row = origin.row + 8 * nt + g;
        if (row < job.rows) {
          codeFragment<BITS>(job.w + row * job.codeRowBytes + block * (4 * BITS), t, b[nt]);
        } else {
          b[nt][0] = 0u;
          b[nt][1] = 0u;
        }
      }
      for (int mt = 0; mt < kTokenTiles; ++mt)
        for (int nt = 0; nt < kRowTiles; ++nt)
          mma(sums[mt][nt], a[mt], b[nt], job.signedCodes != 0);
    }
    // The group's scales and mins: rows 2t, 2t + 1 of each row tile, tokens
    // g, g + 8 of each token tile.
    float scale[kRowTiles][2], minimum[kRowTiles][2], activationScale[kTokenTiles][2], activationSum[kTokenTiles][2];
    for (int nt = 0; nt < kRowTiles; ++nt)
      for (int j = 0; j < 2; ++j) {
        const int64_t row = origin.row + 8 * nt + 2 * t + j;
        scale[nt][j] = minimum[nt][j] = 0.0f;
        if (row >= job.rows)
          continue;
        const uint8_t *header = headers + (row * job.groups + group) * headerBytes;
        if (job.symmetric) {
          scale[nt][j] = headerValue(loadShort(header), job.bf16Scale != 0);
          minimum[nt][j] = job.signedCodes ? 0.0f : symmetricMin * scale[nt][j];
        } else {
          const unsigned word = loadWord(header);
          scale[nt][j] = headerValue(static_cast<unsigned short>(word & 0xFFFFu), job.bf16Scale != 0);
          minimum[nt][j] = headerValue(static_cast<unsigned short>(word >> 16), job.bf16Scale != 0);
        }
      }
    for (int mt = 0; mt < kTokenTiles; ++mt)
      for (int h = 0; h < 2; ++h) {
        const int64_t token = origin.token + 16 * mt + g + 8 * h;
        activationScale[mt][h] = activationSum[mt][h] = 0.0f;
        if (token >= job.tokens)
          continue;
#if defined(__CUDA_ARCH__)
        activationScale[mt][h] = __ldg(job.qScales + token * job.groups + group);
        activationSum[mt][h] = __ldg(job.qSums + token * job.groups + group);
#else
        activationScale[mt][h] = job.qScales[token * job.groups + group];
        activationSum[mt][h] = job.qSums[token * job.groups + group];
#endif
      }
    for (int mt = 0; mt < kTokenTiles; ++mt)
      for (int nt = 0; nt < kRowTiles; ++nt)
        for (int i = 0; i < 4; ++i) {
          // gemvRowsScalar: total += sum * activation scale * scale + min * activation sum.
          float term = mulRn(mulRn(static_cast<float>(sums[mt][nt][i]), activationScale[mt][i >> 1]), scale[nt][i & 1]);
          if (!job.signedCodes)
            term = addRn(term, mulRn(minimum[nt][i & 1], activationSum[mt][i >> 1]));
          acc[mt][nt][i] = addRn(acc[mt][nt][i], term);
        }
  }
  for (int mt = 0; mt < kTokenTiles; ++mt)
    for (int nt = 0; nt < kRowTiles; ++nt)
      for (int i = 0; i < 4; ++i) {
        const int64_t token = origin.token + 16 * mt + accumulatorToken(lane, i);
        const int64_t row = origin.row + 8 * nt + accumulatorRow(lane, i);
        if (token < job.tokens && row < job.rows)
          job.y[token * job.ldy + row] = acc[mt][nt][i];
      }
}

} // namespace moe::cuda::tensor

#endif // MOE_KERNELS_CUDA_TENSORTILES_H
