//===- GroupPlanes.cpp - A group-format matrix as a code plane and a header plane -===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "common/GroupPlanes.h"

#include <cstring>

namespace moe::quant {
namespace {

size_t alignUp16(size_t n) { return (n + 15) / 16 * 16; }

} // namespace

GroupPlanes groupPlanes(const QuantFormat &format, int64_t rows, int64_t cols) {
  GroupPlanes planes;
  planes.rows = rows;
  planes.cols = cols;
  planes.groups = format.groupsPerRow(cols);
  planes.blockBytes = static_cast<size_t>(kCodeBlock) * static_cast<size_t>(format.bits) / 8;
  planes.codeRowBytes = alignUp16(static_cast<size_t>(planes.groups) * format.codeBytes());
  planes.headerBytes = format.headerBytes();
  planes.headerOffset = static_cast<size_t>(rows) * planes.codeRowBytes;
  planes.totalBytes = planes.headerOffset + alignUp16(static_cast<size_t>(rows * planes.groups) * planes.headerBytes);
  return planes;
}

void splitIntoPlanes(const QuantFormat &format, int64_t rows, int64_t cols, const uint8_t *packed, uint8_t *out) {
  const GroupPlanes planes = groupPlanes(format, rows, cols);
  std::memset(out, 0, planes.totalBytes);
  const size_t codeBytes = format.codeBytes(), groupBytes = format.groupBytes();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < planes.groups; ++g) {
      const uint8_t *group = packed + static_cast<size_t>(r * planes.groups + g) * groupBytes;
      std::memcpy(out + planes.headerOffset + static_cast<size_t>(r * planes.groups + g) * planes.headerBytes, group,
                  planes.headerBytes);
      std::memcpy(out + static_cast<size_t>(r) * planes.codeRowBytes + static_cast<size_t>(g) * codeBytes,
                  group + planes.headerBytes, codeBytes);
    }
}

float planesValue(const QuantFormat &format, const GroupPlanes &planes, const uint8_t *data, int64_t row, int64_t col) {
  const int64_t g = col / format.group, inGroup = col % format.group;
  const uint8_t *header =
      data + planes.headerOffset + static_cast<size_t>(row * planes.groups + g) * planes.headerBytes;
  uint16_t scaleBits, minBits = 0;
  std::memcpy(&scaleBits, header, 2);
  const float scale = scaleToFloat(scaleBits, format.scaleType);
  float min = -static_cast<float>(format.zeroPoint()) * scale;
  if (!format.symmetric) {
    std::memcpy(&minBits, header + 2, 2);
    min = scaleToFloat(minBits, format.scaleType);
  }
  const uint8_t *codes =
      data + static_cast<size_t>(row) * planes.codeRowBytes + static_cast<size_t>(g) * format.codeBytes();
  return static_cast<float>(unpackCode(codes, format.bits, inGroup)) * scale + min;
}

} // namespace moe::quant
