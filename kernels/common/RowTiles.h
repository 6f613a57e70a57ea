//===- RowTiles.h - A group-format matrix as tiles of 16 rows ---*- C++ -*-===//
//
// Part of moec. The layout the CPU's integer products read a group-format
// matrix in (QuantFormat.h): made per call by prefill, or once when a layer
// is loaded, for both decode and prefill. In the package layout each row
// interleaves its group headers with its codes, so a kernel going row by
// row pays a header load and conversion per group and row. A tile holds 16
// consecutive rows (the last tile padded with zero rows), group by group:
//   - the 16 rows' scales (16-bit, as stored), then for asymmetric formats
//     their 16 mins;
//   - the group's code lines: a line is 64 bytes, the 16 rows' 32-bit word
//     k of the group's codes side by side (row i at bytes 4i .. 4i + 3).
//     2-, 4- and 8-bit codes keep their stored bits: in the planar block
//     layout word d of a block holds codes d*4 .. d*4+3 of the block's
//     chunks d, d + W, d + 2W, ... (W = bits words per block) in its
//     successive bit fields, so one vpdpbusd per field adds four codes of
//     16 rows. Two's complement codes (ggml's Q8_0) are offset by 128 (the
//     min becomes -128 * scale). 3-bit codes are unpacked to one byte each
//     (word k = codes 4k .. 4k + 3 of the group).
// Every value is the package's: code * scale + min, bit for bit.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_COMMON_ROWTILES_H
#define MOE_KERNELS_COMMON_ROWTILES_H

#include "common/QuantFormat.h"

#include <cstddef>
#include <cstdint>

namespace moe::quant {

constexpr int kTileRows = 16;

/// Where the parts of a matrix's tiles lie.
struct RowTileLayout {
  int64_t tiles = 0, groups = 0;
  int linesPerGroup = 0;  ///< 64-byte code lines of one group.
  int chunksPerLine = 0;  ///< 4-code chunks a line holds per row (its bit fields).
  size_t headerBytes = 0; ///< 32 (scales) or 64 (scales, then mins).
  size_t groupStride = 0; ///< headerBytes + 64 * linesPerGroup.
  size_t tileBytes = 0;   ///< groups * groupStride.
  size_t totalBytes = 0;  ///< tiles * tileBytes.
};

RowTileLayout rowTileLayout(const QuantFormat &format, int64_t rows, int64_t cols);

/// 4-code chunks a line holds per row for a code width: the bit fields of a
/// stored word (8 / bits), or one byte-sized chunk of unpacked 3-bit codes.
constexpr int tileChunksPerLine(int bits) { return bits == 3 ? 1 : 8 / bits; }

/// Chunk c (codes 4c .. 4c + 3) of a group lies at position p = this: in
/// line p / chunksPerLine, bit field p % chunksPerLine of each row's word.
/// (Chunk j of a 32-code block is field j / W of the block's word j % W,
/// W = 8 / chunksPerLine words per block.)
constexpr int64_t tileLinePosition(int bits, int64_t chunk) {
  const int perLine = tileChunksPerLine(bits);
  if (perLine == 1)
    return chunk;
  const int words = 8 / perLine;
  const int64_t j = chunk % 8;
  return chunk - j + perLine * (j % words) + j / words;
}

/// Scalar reference: the matrix in the package layout at `packed` (two's
/// complement codes when `signedCodes`) as tiles (rowTileLayout(...).
/// totalBytes at `out`).
void packRowTilesReference(const QuantFormat &format, bool signedCodes, const uint8_t *packed, int64_t rows,
                           int64_t cols, uint8_t *out);

} // namespace moe::quant

#endif // MOE_KERNELS_COMMON_ROWTILES_H
