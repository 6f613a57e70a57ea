//===- GroupPlanes.h - A group-format matrix as a code plane and a header plane -*- C++ -*-===//
//
// Part of moec. The layout the CUDA products read a group-format matrix in
// (QuantFormat.h), made from the package's bytes when the matrix is copied
// to the device. A package row interleaves 2- or 4-byte group headers with
// the codes, so a GPU warp reading consecutive blocks of a row reads
// misaligned, scattered words. Planes keep the same codes and headers,
// moved apart:
//   - the code plane: row r at r * codeRowBytes; its blocks of 32 codes
//     (4 * bits bytes each, planar inside as in QuantFormat.h) one after
//     another, so block b of a row is at b * 4 * bits; rows padded with
//     zeros to a multiple of 16 bytes (16-byte loads);
//   - the header plane, at headerOffset: the rows' group headers
//     (GroupHeader, or its scale alone for symmetric formats), row-major.
// Nothing is re-quantized: the values are the package's, bit for bit.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_KERNELS_COMMON_GROUPPLANES_H
#define MOE_KERNELS_COMMON_GROUPPLANES_H

#include "common/QuantFormat.h"

#include <cstddef>
#include <cstdint>

namespace moe::quant {

/// Where the planes of a [rows, cols] matrix of a format lie.
struct GroupPlanes {
  int64_t rows = 0, cols = 0, groups = 0;
  size_t blockBytes = 0;   ///< 4 * bits: one block of 32 codes.
  size_t codeRowBytes = 0; ///< A row of the code plane, a multiple of 16.
  size_t headerBytes = 0;  ///< One group's header (2 or 4).
  size_t headerOffset = 0; ///< The header plane's start, a multiple of 16.
  size_t totalBytes = 0;
};

GroupPlanes groupPlanes(const QuantFormat &format, int64_t rows, int64_t cols);

/// Moves a matrix in the package layout (format.matrixBytes(rows, cols)
/// bytes at `packed`) into planes (groupPlanes(...).totalBytes at `out`).
void splitIntoPlanes(const QuantFormat &format, int64_t rows, int64_t cols, const uint8_t *packed, uint8_t *out);

/// Scalar reference of what a kernel reads: the value of (row, col) in planes.
float planesValue(const QuantFormat &format, const GroupPlanes &planes, const uint8_t *data, int64_t row, int64_t col);

} // namespace moe::quant

#endif // MOE_KERNELS_COMMON_GROUPPLANES_H
